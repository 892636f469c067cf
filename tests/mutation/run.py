"""Mutation check: deliberate bugs, each applied to a COPY of the package, must make the tests
that guard against them fail (issue 32). Run from the repository root:

    python tests/mutation/run.py            # the Python mutations (a few minutes)
    python tests/mutation/run.py --cpp      # plus the C++ one (rebuilds the copy's CPU extension)
    python tests/mutation/run.py --list

Each mutation is an exact text replacement that fails loudly when its target text is gone (so
the list cannot silently rot when the code changes). The copy runs in a fresh interpreter
started with -S (no site hooks: the editable install's finder, which would import the real
package first, is never installed) and PYTHONPATH = the copy, then the site-packages; the child
checks that `dowser` comes from the copy. Before any mutation the selected tests must pass on the
unmutated copy, else a "caught" mutation would mean nothing. Exit status 0 = every mutation
caught.

The C++ mutation (--cpp) changes one instruction-set path only: a copy of kernels_impl.h with
the bug is included by csrc/cpu/isa/kernels_default.cpp alone. It builds the copy's CPU
extension with setup.py (ninja) in --build-dir (default build/mutation under the repository): the
first build compiles everything (tens of minutes on 2 busy cores), later runs only the mutated
unit (files are synced, so unchanged sources keep their times).
"""

from __future__ import annotations

import argparse
import filecmp
import os
import shutil
import site
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
COPY_DIRS = ("dowser", "tests", "kernels", "bench", "csrc", "docs", "examples")
COPY_FILES = ("README.md", "pyproject.toml", "setup.py")


@dataclass
class Mutation:
    name: str
    why: str
    edits: list[tuple[str, str, str]]  # (file, exact old text, new text)
    tests: list[str]  # pytest arguments, relative to the copy
    cpp: bool = False


MUTATIONS = [
    Mutation(
        "refresh-drops-only-1d-masters",
        "refresh_master_weights forgets only the masters of 1-D parameters",
        [("dowser/optim.py",
          '        for st in self.state.values():\n            st.pop("master", None)',
          '        for p, st in self.state.items():\n            if p.dim() == 1:\n'
          '                st.pop("master", None)')],
        ["tests/test_master.py", "-k", "refresh"]),
    Mutation(
        "reference-master-read-rounded",
        "the reference reads the master rounded to the parameter dtype (a bug the 'reference' "
        "backend case cannot see when it compares the reference with itself)",
        [("dowser/reference.py",
          "        return idx, gf, _state_view(master, idx, compact).clone()",
          "        return idx, gf, _state_view(master, idx, compact).clone().to(p.dtype).float()")],
        ["tests/test_master.py", "-k", "reference and (op_with_masters or sgd_op)"]),
    Mutation(
        "ties-broken-the-other-way",
        "the key selection takes the LAST of tied candidates in the threshold bin",
        [("dowser/_keys.py",
          "        order = torch.sort(low, stable=True).indices[:want]",
          "        order = (low.numel() - 1 - torch.sort(low.flip(0), stable=True).indices)[:want]")],
        ["tests/test_mask_methods.py", "-k", "chunked_key_selection"]),
    Mutation(
        "weight-decay-writes-frozen",
        "the reference AdamW decays the whole parameter, frozen entries included",
        [("dowser/reference.py",
          "        _write_back(p, idx, pf, sel)\n        if w is not None:\n"
          "            _put(w, idx, compact, pf, sel)",
          "        if idx is not None:\n            p.mul_(1.0 - lr * weight_decay)\n"
          "        _write_back(p, idx, pf, sel)\n        if w is not None:\n"
          "            _put(w, idx, compact, pf, sel)")],
        ["tests/test_optim.py", "-k", "random_mask_trainable_match_frozen_untouched and reference"]),
    Mutation(
        "cpp-default-path-master-moment-store",
        "C++ scalar (default) path only: in master mode the dense exp_avg_sq is never stored",
        [("csrc/cpu/kernels_impl.h",
          "      if (need_s2) scatter_any<kF32>(it, it.s2, a, e, b.s2b);",
          "      if (need_s2 && it.master == nullptr) scatter_any<kF32>(it, it.s2, a, e, b.s2b);")],
        ["tests/test_cpu_isa.py", "-k", "adamw_master_weights and default"],
        cpp=True),
]


def _copy_tree(dst: Path) -> None:
    """Sync the sources into dst: a file is rewritten (with a new time) only when its bytes
    differ, so an incremental build there recompiles exactly what changed."""
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.so", "build", "*.egg-info")
    for d in COPY_DIRS:
        if (ROOT / d).is_dir():
            for src in sorted((ROOT / d).rglob("*")):
                rel = src.relative_to(ROOT)
                if src.is_dir() or ignore(str(src.parent), [src.name]) or any(
                        part in ("__pycache__", "build") for part in rel.parts):
                    continue
                out = dst / rel
                if out.is_file() and filecmp.cmp(src, out, shallow=False):
                    continue
                out.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy(src, out)
    for f in COPY_FILES:
        if (ROOT / f).is_file() and not ((dst / f).is_file() and filecmp.cmp(ROOT / f, dst / f, shallow=False)):
            shutil.copy(ROOT / f, dst / f)
    # kernels/ installs as dowser.kernels (setup.py's package_dir; the editable finder maps it)
    if (ROOT / "kernels").is_dir():
        shutil.copytree(ROOT / "kernels", dst / "dowser" / "kernels", dirs_exist_ok=True,
                        ignore=shutil.ignore_patterns("__pycache__"))


def _apply(tree: Path, m: Mutation) -> None:
    for rel, old, new in m.edits:
        path = tree / rel
        if m.cpp and rel == "csrc/cpu/kernels_impl.h":  # one ISA path: a mutated copy of the header
            path = tree / "csrc/cpu/kernels_impl_mutant.h"
            text = (tree / rel).read_text()
        else:
            text = path.read_text()
        n = text.count(old)
        if n != 1:
            raise SystemExit(f"mutation {m.name}: the target text occurs {n} times in {rel} "
                             "(the code changed: update tests/mutation/run.py)")
        path.write_text(text.replace(old, new))
    if m.cpp:
        unit = tree / "csrc/cpu/isa/kernels_default.cpp"
        text = unit.read_text()
        if text.count('#include "../kernels_impl.h"') != 1:
            raise SystemExit("mutation: kernels_default.cpp no longer includes ../kernels_impl.h")
        unit.write_text(text.replace('#include "../kernels_impl.h"', '#include "../kernels_impl_mutant.h"'))


def _env(tree: Path) -> dict[str, str]:
    paths = [str(tree)] + site.getsitepackages() + [site.getusersitepackages()]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(paths), PYTHONDONTWRITEBYTECODE="1")
    env.pop("DOWSER_CPU_CAPABILITY", None)
    return env


def _where(tree: Path) -> str:
    out = subprocess.run([sys.executable, "-S", "-c", "import dowser, dowser._ext as e; "
                          "print(dowser.__file__); print(e.info()['how'])"],
                         cwd=tree, env=_env(tree), capture_output=True, text=True, timeout=300)
    if out.returncode != 0:
        raise SystemExit(f"the copy does not import: {out.stderr[-2000:]}")
    file, how = out.stdout.split()[-2:]
    if not Path(file).resolve().is_relative_to(tree.resolve()):
        raise SystemExit(f"the child imported dowser from {file}, not from the copy {tree}")
    return how


def _pytest(tree: Path, args: list[str]) -> tuple[int, str]:
    cmd = [sys.executable, "-S", "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *args]
    out = subprocess.run(cmd, cwd=tree, env=_env(tree), capture_output=True, text=True,
                         timeout=1800)
    tail = [ln for ln in out.stdout.strip().splitlines() if ln.strip()]
    return out.returncode, tail[-1] if tail else out.stderr[-300:]


def _build(tree: Path) -> None:
    env = dict(_env(tree), DOWSER_NO_CUDA="1")
    t0 = time.time()
    out = subprocess.run([sys.executable, "-S", "setup.py", "build_ext", "--inplace"], cwd=tree,
                         env=env, capture_output=True, text=True, timeout=7200)
    if out.returncode != 0 or not list((tree / "dowser").glob("_C*.so")):
        raise SystemExit(f"building the copy's extension failed:\n{out.stdout[-2000:]}{out.stderr[-2000:]}")
    print(f"  built the copy's CPU extension in {time.time() - t0:.0f} s")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cpp", action="store_true", help="also the C++ mutation (builds the extension)")
    ap.add_argument("--build-dir", type=Path, default=ROOT / "build" / "mutation",
                    help="where the C++ mutant is built (kept for incremental rebuilds)")
    ap.add_argument("--list", action="store_true")
    ap.add_argument("--only", action="append", help="run only the named mutation(s)")
    args = ap.parse_args(argv)
    chosen = [m for m in MUTATIONS if (args.cpp or not m.cpp) and (not args.only or m.name in args.only)]
    if args.list:
        for m in MUTATIONS:
            print(f"{m.name}{' (--cpp)' if m.cpp else ''}: {m.why}\n    pytest {' '.join(m.tests)}")
        return 0
    import dowser  # the real package: its built extension is reused by the Python mutations

    built = sorted(Path(dowser.__file__).parent.glob("_C*.so"))
    missed, t_all = [], time.time()
    with tempfile.TemporaryDirectory(prefix="dowser-mutation-") as tmp:
        base = Path(tmp) / "base"
        _copy_tree(base)
        for so in built:
            shutil.copy2(so, base / "dowser" / so.name)
        how = _where(base)
        print(f"copy at {base} (dowser imported from the copy; C++ ops: {how or 'none'})")
        py = [m for m in chosen if not m.cpp]
        # the guarding tests pass on the unmutated copy
        for m in py:
            rc, line = _pytest(base, m.tests)
            if rc != 0:
                print(f"BASELINE FAILS for {m.name}: {line}")
                return 1
        print(f"baseline: the {len(py)} test selections pass on the unmutated copy")
        for m in py:
            tree = Path(tmp) / m.name
            shutil.copytree(base, tree)
            _apply(tree, m)
            t0 = time.time()
            rc, line = _pytest(tree, m.tests)
            caught = rc != 0
            print(f"{'caught' if caught else 'MISSED'}  {m.name}: {line} ({time.time() - t0:.0f} s)")
            if not caught:
                missed.append(m.name)
            shutil.rmtree(tree)
        for m in [m for m in chosen if m.cpp]:
            tree = args.build_dir.resolve()
            tree.mkdir(parents=True, exist_ok=True)
            _copy_tree(tree)
            _apply(tree, m)  # the sync restored the unit and header: only they recompile
            _build(tree)
            if _where(tree) != "built":
                raise SystemExit("the C++ mutant's extension did not load")
            rc, line = _pytest(base, m.tests)  # the real extension: the selection passes
            if rc != 0:
                print(f"BASELINE FAILS for {m.name}: {line}")
                return 1
            rc, line = _pytest(tree, m.tests)
            caught = rc != 0
            print(f"{'caught' if caught else 'MISSED'}  {m.name}: {line}")
            if not caught:
                missed.append(m.name)
    print(f"{len(chosen) - len(missed)} of {len(chosen)} mutations caught in {time.time() - t_all:.0f} s"
          + (f"; MISSED: {', '.join(missed)}" if missed else ""))
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
