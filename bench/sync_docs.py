"""Fill the results blocks of README.md and docs/*.md from bench/results/*.md, so the numbers
in the prose cannot drift from the measurements.

A block is

    <!-- results: bench/results/select-cpu.md columns=case,method,median_s where=method:naive|dowser -->
    ... (written by this script: a source line and the selected table)
    <!-- /results -->

Options (all optional, separated by spaces): `table=N` (the N-th table of the file, 1-based;
default 1), `rows=I-J,K` (these data rows, 1-based), `where=col:v1|v2` (rows whose `col` is one
of the values; repeatable; quote it when values hold spaces), `columns=a,b,c` (these columns,
in this order). A selection of no row is an error. Everything between the markers is replaced.

    python bench/sync_docs.py            # rewrite the blocks
    python bench/sync_docs.py --check    # exit 1 and name the stale blocks (tests/test_docs.py)
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BLOCK = re.compile(r"(<!-- results: (?P<spec>[^>]*?) -->\n)(?P<body>.*?)(<!-- /results -->)",
                   re.S)


def documents(root: Path = ROOT) -> list[Path]:
    """README.md and every docs/*.md."""
    return [root / "README.md"] + sorted((root / "docs").glob("*.md"))


def _tables(text: str) -> list[list[list[str]]]:
    tables, cur = [], []
    for line in text.splitlines() + [""]:
        if line.startswith("|"):
            cur.append([c.strip() for c in line.strip().strip("|").split("|")])
        elif cur:
            tables.append(cur)
            cur = []
    return [t for t in tables if len(t) >= 2]


def _field(text: str, key: str) -> str:
    m = re.search(rf"^- {re.escape(key)}: (.*)$", text, re.M)
    return m.group(1).strip() if m else "?"


def render(spec: str, doc: Path, root: Path = ROOT) -> str:
    """The body of one block: where the numbers come from, then the selected table."""
    parts = shlex.split(spec)  # quote values that hold spaces: where="config:torch AdamW fused"
    if not parts:
        raise ValueError(f"{doc}: a results block names no file")
    src = root / parts[0]
    if not src.is_file():
        raise ValueError(f"{doc}: results block names {parts[0]}, which does not exist")
    opts: dict[str, list[str]] = {}
    for p in parts[1:]:
        key, _, val = p.partition("=")
        if key not in ("table", "rows", "columns", "where") or not val:
            raise ValueError(f"{doc}: bad option {p!r} in results block for {parts[0]}")
        opts.setdefault(key, []).append(val)
    text = src.read_text()
    tables = _tables(text)
    n = int(opts.get("table", ["1"])[0])
    if not 1 <= n <= len(tables):
        raise ValueError(f"{doc}: {parts[0]} has {len(tables)} tables, not table={n}")
    head, rows = tables[n - 1][0], tables[n - 1][2:]
    if "rows" in opts:
        picked = []
        for part in opts["rows"][0].split(","):
            lo, _, hi = part.partition("-")
            picked += rows[int(lo) - 1:int(hi or lo)]
        rows = picked
    for cond in opts.get("where", []):
        col, _, vals = cond.partition(":")
        if col not in head:
            raise ValueError(f"{doc}: {parts[0]} has no column {col!r}")
        keep = set(vals.split("|"))
        rows = [r for r in rows if r[head.index(col)] in keep]
    if not rows:
        raise ValueError(f"{doc}: the results block for {parts[0]} selects no row ({spec})")
    cols = opts.get("columns", [",".join(head)])[0].split(",")
    missing = [c for c in cols if c not in head]
    if missing:
        raise ValueError(f"{doc}: {parts[0]} has no column {missing[0]!r} (it has {head})")
    idx = [head.index(c) for c in cols]
    rel = os.path.relpath(src, doc.parent).replace(os.sep, "/")
    command = _field(text, "command")
    command = command if len(command) <= 60 else command[:57].rstrip() + "…`"
    lines = [f"From [`{parts[0]}`]({rel}): {_field(text, 'device')}, {_field(text, 'date')}, "
             f"{command}.", "",
             "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(r[i] if i < len(r) else "" for i in idx) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def sync(doc: Path, root: Path = ROOT) -> tuple[str, str]:
    """(current text, text with every block re-rendered) of one document."""
    old = doc.read_text()
    new = BLOCK.sub(lambda m: m.group(1) + render(m.group("spec"), doc, root) + m.group(4), old)
    return old, new


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--check", action="store_true",
                        help="change nothing; exit 1 if a block differs from its results file")
    args = parser.parse_args(argv)
    stale = []
    for doc in documents():
        old, new = sync(doc)
        if old != new:
            stale.append(doc.relative_to(ROOT))
            if not args.check:
                doc.write_text(new)
    if args.check and stale:
        print("out of date with bench/results: " + ", ".join(map(str, stale))
              + " (run python bench/sync_docs.py)", file=sys.stderr)
        return 1
    if not args.check:
        print("updated: " + (", ".join(map(str, stale)) or "nothing"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
