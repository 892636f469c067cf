"""README.md and docs/: numbers equal to bench/results (bench/sync_docs.py), the front page
holds the two commands and a quickstart that runs, and every relative link resolves."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if not (ROOT / "README.md").is_file():  # tests copied out to check an installed package
    pytest.skip("needs the source tree's README.md and docs/", allow_module_level=True)
README = (ROOT / "README.md").read_text()


def _sync_docs():
    spec = importlib.util.spec_from_file_location("sync_docs", ROOT / "bench" / "sync_docs.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_readme_and_docs_match_the_results_files():
    sd = _sync_docs()
    stale = [str(d.relative_to(ROOT)) for d in sd.documents() if sd.sync(d)[0] != sd.sync(d)[1]]
    assert not stale, f"{stale} differ from bench/results: run python bench/sync_docs.py"
    assert README.count("<!-- results: ") >= 3


def test_sync_detects_a_changed_number_and_a_bad_block(tmp_path):
    sd = _sync_docs()
    (tmp_path / "bench" / "results").mkdir(parents=True)
    (tmp_path / "docs").mkdir()
    res = tmp_path / "bench" / "results" / "x.md"
    res.write_text("# x\n\n- device: CPU\n- date: today\n- command: `x.py`\n\n"
                   "| case | s |\n|---|---|\n| a b | 1.5 |\n| c | 2 |\n")
    doc = tmp_path / "docs" / "d.md"
    doc.write_text('text\n<!-- results: bench/results/x.md "where=case:a b" -->\nold\n'
                   "<!-- /results -->\nmore\n")
    old, new = sd.sync(doc, tmp_path)
    assert "| a b | 1.5 |" in new and "| c |" not in new and "](../bench/results/x.md)" in new
    doc.write_text(new)
    assert sd.sync(doc, tmp_path)[0] == sd.sync(doc, tmp_path)[1]  # in sync now
    res.write_text(res.read_text().replace("1.5", "1.7"))
    old, new = sd.sync(doc, tmp_path)
    assert old != new and "| a b | 1.7 |" in new
    doc.write_text("<!-- results: bench/results/x.md where=case:zzz -->\n<!-- /results -->\n")
    with pytest.raises(ValueError, match="selects no row"):
        sd.sync(doc, tmp_path)


def _fences(text: str) -> list[tuple[str, int, str]]:
    """(language, first line number, body) of every fenced block."""
    out = []
    for m in re.finditer(r"^```(\w*)\n(.*?)^```", text, re.S | re.M):
        out.append((m.group(1), text[:m.start()].count("\n") + 1, m.group(2)))
    return out


def test_front_page_holds_the_two_commands_then_the_quickstart():
    fences = _fences(README)
    lang, _, body = fences[0]
    cmds = [line for line in body.splitlines() if line.startswith("pip install")]
    # what .ci/run greps, verbatim
    assert len(cmds) == 2 and re.match(r"^pip install .*&& dowser demo", cmds[0])
    assert re.match(r"^pip install .*\[test\].*&& python -m pytest", cmds[1])
    lang, start, body = fences[1]
    assert lang == "python" and start <= 25, "the quickstart starts on the first screen"
    assert 20 <= len(body.splitlines()) <= 45
    assert "MEASURED_TIMES" not in README
    assert re.search(r"python -m pytest.{0,80}\d+ s", README, re.S), "the suite's time is stated"


class _Tokenizer:
    """Enough of a tokenizer for the quickstart on a tiny model: bytes modulo the vocabulary."""

    bos_token_id, eos_token_id, pad_token_id, all_special_ids = 1, 2, 0, [0, 1, 2]

    def __len__(self):
        return 97

    def __call__(self, texts, return_tensors="pt", padding=True):
        ids = [[1] + [3 + b % 94 for b in t.encode()] for t in texts]
        n = max(map(len, ids))
        input_ids = torch.tensor([[0] * (n - len(i)) + i for i in ids])
        return {"input_ids": input_ids, "attention_mask": (input_ids != 0).long()}


def test_readme_quickstart_runs(tmp_path, monkeypatch):
    from tests.models import tiny_llama

    code = _fences(README)[1][2]
    lines = []
    for line in code.splitlines():
        if "from_pretrained(" in line:
            line = line.split("=")[0] + ("= tiny_llama()" if "model" in line.split("=")[0]
                                         else "= _Tokenizer()")
        lines.append(line)
    code = "\n".join(lines)
    assert "layers=8)" in code
    code = code.replace("layers=8)", "layers=2, n_samples=4, batch_size=2, seq_len=12, "
                                     "progress=False)")
    monkeypatch.chdir(tmp_path)
    scope = {"tiny_llama": tiny_llama, "_Tokenizer": _Tokenizer}
    exec(compile(code, "README.md quickstart", "exec"), scope)
    assert (tmp_path / "masks.safetensors").exists()
    moved = sum(int((p != scope["before"][n]).sum()) for n, p in scope["params"].items())
    assert moved > 0, "the quickstart trained nothing"
    # the dense norms alone would satisfy that: every masked matrix's trainable entries moved
    for name, packed in scope["masks"].items():
        p = scope["params"][name]
        train = scope["dowser"].ops.unpack_mask(packed, p.shape)
        assert bool((p.detach()[train] != scope["before"][name][train]).any()), \
            f"{name}: no trainable entry moved"


def test_relative_links_resolve():
    bad = []
    for doc in [ROOT / "README.md"] + sorted((ROOT / "docs").glob("*.md")):
        for target in re.findall(r"\]\(([^)#\s]+)\)", doc.read_text()):
            if "://" in target:
                continue
            if not (doc.parent / target).exists():
                bad.append(f"{doc.relative_to(ROOT)} -> {target}")
    assert not bad, bad
