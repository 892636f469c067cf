"""Every bad input to the `dowser` command gets one line on stderr that says what to do, exit
status 2, before any model is loaded (the loader is replaced by one that fails the test). How
fast that is belongs in benchmarks, not in a wall-clock assertion here."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dowser import _artifacts, cli

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def run(monkeypatch, capsys):
    def no_load(*a, **k):
        pytest.fail("a model was loaded before the arguments were checked")

    monkeypatch.setattr(cli, "_load_model", no_load)
    import transformers

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", no_load)

    def go(*argv: str, code: int = 2) -> str:
        capsys.readouterr()
        rc = cli.main([str(a) for a in argv])
        out, err = capsys.readouterr()
        assert rc == code, (rc, out, err)
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("dowser"), err
        assert "Traceback" not in err and not out.strip(), (out, err)
        return lines[0]

    return go


@pytest.fixture
def model_dir(tmp_path):
    d = tmp_path / "tiny"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "llama", "num_hidden_layers": 2}))
    return d


def test_rho_outside_0_1(run, tmp_path, model_dir):
    line = run("probe", model_dir, "--rho", "1.5", "--out", tmp_path / "m.safetensors")
    assert "--rho" in line and "outside [0, 1]" in line and "e.g. 0.1" in line


def test_rho_not_a_number(run, tmp_path, model_dir):
    line = run("probe", model_dir, "--rho", "nan", "--out", tmp_path / "m.safetensors")
    assert "--rho" in line and "[0, 1]" in line


def test_demo_rho_outside_0_1(run):
    assert "--rho" in run("demo", "--rho", "-0.1", "--model", "tiny")


def test_layers_zero(run, tmp_path, model_dir):
    line = run("probe", model_dir, "--layers", "0", "--out", tmp_path / "m.safetensors")
    assert "--layers" in line and "at least 1" in line


def test_layers_more_than_the_config_has(run, tmp_path, model_dir):
    line = run("probe", model_dir, "--layers", "999", "--out", tmp_path / "m.safetensors")
    assert "has 2 decoder layers" in line and "from 1 to 2" in line


def test_layers_of_a_vision_language_config(run, tmp_path):
    d = tmp_path / "vlm"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "llava", "text_config": {
        "model_type": "llama", "num_hidden_layers": 3}, "vision_config": {"num_hidden_layers": 24}}))
    assert "has 3 decoder layers" in run("probe", d, "--layers", "4", "--out", tmp_path / "m")


def test_layers_more_than_the_gguf_has(run, tmp_path):
    gguf = pytest.importorskip("gguf")
    path = tmp_path / "tiny.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_token_list([f"tok{i}" for i in range(300)])  # an array before the count: skipped
    w.add_token_scores([0.0] * 300)
    w.add_block_count(4)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    assert cli._gguf_block_count(str(path)) == 4
    line = run("probe", path, "--layers", "5", "--out", tmp_path / "m.safetensors")
    assert "has 4 decoder layers" in line


def test_missing_gguf_file(run, tmp_path):
    line = run("probe", tmp_path / "nowhere" / "model.gguf", "--out", tmp_path / "m.safetensors")
    assert "no such file" in line and "huggingface" not in line.lower()


def test_not_a_gguf_file(run, tmp_path):
    fake = tmp_path / "model.gguf"
    fake.write_text("hello")
    assert "not a GGUF file" in run("probe", fake, "--out", tmp_path / "m.safetensors")


def test_missing_model_directory(run, tmp_path):
    line = run("probe", tmp_path / "no-such-model", "--out", tmp_path / "m.safetensors")
    assert "no such directory" in line


def test_directory_without_config(run, tmp_path):
    d = tmp_path / "weights"
    d.mkdir()
    (d / "model.gguf").write_bytes(b"GGUF")
    line = run("probe", d, "--out", tmp_path / "m.safetensors")
    assert "no config.json" in line and "model.gguf" in line  # points to the GGUF inside


def test_output_folder_missing(run, tmp_path, model_dir):
    line = run("probe", model_dir, "--out", tmp_path / "no-dir" / "m.safetensors")
    assert "--out" in line and "does not exist" in line


def test_batch_larger_than_samples(run, tmp_path, model_dir):
    line = run("probe", model_dir, "--n-samples", "2", "--batch-size", "4", "--out",
               tmp_path / "m.safetensors")
    assert "--batch-size 4" in line


@pytest.mark.skipif(torch.cuda.is_available(), reason="this host has CUDA")
def test_cuda_device_without_cuda(run, tmp_path, model_dir):
    line = run("probe", model_dir, "--device", "cuda", "--out", tmp_path / "m.safetensors")
    assert "no CUDA device" in line


def test_inspect_a_text_file(run):
    line = run("inspect", Path(__file__))  # any text file (this one is there when installed)
    assert "is not a dowser mask file" in line and "dowser probe" in line


def test_inspect_a_foreign_safetensors_file(run, tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "model.safetensors"
    save_file({"w": torch.zeros(3)}, str(path), metadata={"format": "pt"})
    assert "is not a dowser mask file" in run("inspect", path)


def test_inspect_a_statistics_file(run, tmp_path):
    path = tmp_path / "stats.safetensors"
    _artifacts.save(path, {"x": torch.zeros(2)}, "dowser.ProbeStats", {})
    assert "is a dowser statistics file, not a dowser mask file" in run("inspect", path)


def test_inspect_missing_file(run, tmp_path):
    assert "no such file" in run("inspect", tmp_path / "masks.safetensors")


def test_inspect_plot_to_a_missing_folder(run, tmp_path):
    path = tmp_path / "m.safetensors"
    _artifacts.save(path, {"x": torch.zeros(2, dtype=torch.int32)}, "dowser.MaskSet", {})
    assert "does not exist" in run("inspect", path, "--plot", tmp_path / "no" / "m.png")


def test_unknown_option(run, tmp_path, model_dir):
    assert "unrecognized arguments" in run("probe", model_dir, "--out", tmp_path / "m", "--rhox", "1")


def test_a_failure_is_one_line_and_debug_shows_the_traceback(monkeypatch, capsys, model_dir,
                                                             tmp_path):
    def broken(*a, **k):
        raise RuntimeError("weights are\ncorrupt")

    monkeypatch.setattr(cli, "_load_model", broken)
    argv = ["probe", str(model_dir), "--out", str(tmp_path / "m.safetensors")]
    assert cli.main(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["dowser probe: error: RuntimeError: weights are corrupt (run again with "
                   "--debug for the traceback)"]
    with pytest.raises(RuntimeError, match="corrupt"):
        cli.main(argv + ["--debug"])


def test_the_installed_command_exits_2_with_one_line():
    """The real entry point, in a fresh interpreter (its bound covers importing torch)."""
    proc = subprocess.run([sys.executable, "-m", "dowser.cli", "inspect", str(Path(__file__))],
                          capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1 and "not a dowser mask file" in proc.stderr


@pytest.mark.parametrize("scope", ["matrix", "global"])
def test_inspect_names_the_method_and_plots_every_scope(tmp_path, capsys, scope):
    from dowser.masks import MaskSet
    from dowser.ops import pack_mask

    gen = torch.Generator().manual_seed(0)
    masks, shapes, samples = {}, {}, {}
    for layer in range(2):
        for kind, shape in (("q_proj", (8, 40)), ("down_proj", (40, 12))):
            name = f"model.layers.{layer}.mlp.{kind}.weight"
            masks[name] = pack_mask(torch.rand(shape, generator=gen) < 0.1 * (layer + 1))
            shapes[name] = shape
            samples[name] = torch.rand(64, generator=gen)
    meta = {"rho": 0.1, "scope": scope, "model_name": "tiny"}
    if scope == "global":
        meta["method"] = "magnitude"
    path, png = tmp_path / "m.safetensors", tmp_path / "m.png"
    MaskSet(masks, shapes, meta, samples).save(path)
    assert cli.main(["inspect", str(path), "--plot", str(png)]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"method={'magnitude' if scope == 'global' else 'dowser'}, rho=0.1")
    assert png.stat().st_size > 10_000
