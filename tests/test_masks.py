"""dowser.build_masks / MaskSet / prepare: exact counts, layouts, files, determinism, CLI."""

from __future__ import annotations

import json
import math

import pytest
import torch

from dowser import MaskSet, build_masks, prepare, probe
from dowser.ops import popcount, unpack_mask
from tests.models import ARCHITECTURES, tiny_gpt2, tiny_llama

FAST = dict(n_samples=2, batch_size=2, n_rademacher=2, seq_len=10, progress=False)


def _k(rho, n):
    return int(math.floor(rho * n + 0.5))


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_every_architecture_exact_k(arch):
    model = ARCHITECTURES[arch]()
    stats = probe(model, layers=1, **FAST)
    masks = build_masks(model, stats, rho=0.1)
    params = dict(model.named_parameters())
    assert isinstance(masks, MaskSet) and len(masks) == len(stats)
    for module_name in stats:
        pname = module_name + ".weight"
        assert pname in masks and pname in params
        assert masks.shapes[pname] == tuple(params[pname].shape)
        assert masks[pname].dtype == torch.int32
        assert popcount(masks[pname]) == _k(0.1, params[pname].numel())


def test_gpt2_conv1d_layout_is_the_stored_weight():
    model = tiny_gpt2()
    stats = probe(model, layers=1, **FAST)
    masks = build_masks(model, stats, rho=0.25)
    mods = dict(model.named_modules())
    for name, e in stats.items():
        w = mods[name].weight  # stored (d_in, d_out)
        d_in, d_out = w.shape
        assert e.out_factors.shape[1] == d_out and e.in_factors.shape[1] == d_in
        dense = e.scores(w.T).T  # scores of z = W h, laid over the stored W^T
        bits = unpack_mask(masks[name + ".weight"], w.shape)
        k = _k(0.25, w.numel())
        chosen, rest = dense[bits], dense[~bits]
        assert bits.sum() == k and chosen.max() <= rest.min() * (1 + 1e-6)


def test_scopes_rho_edges_and_bad_input():
    model = tiny_llama()
    stats = probe(model, layers=1, **FAST)
    total = sum(p.numel() for n, p in model.named_parameters() if n[:-7] in stats)
    glob = build_masks(model, stats, rho=0.1, scope="global")
    assert sum(t for t, _ in glob.counts().values()) == _k(0.1, total)
    assert glob.metadata["scope"] == "global"
    for rho in (0.0, 1.0):
        m = build_masks(model, stats, rho=rho)
        for name, (t, n) in m.counts().items():
            assert t == (n if rho == 1.0 else 0)
    for bad in (-0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match="rho"):
            build_masks(model, stats, rho=bad)
    with pytest.raises(ValueError, match="scope"):
        build_masks(model, stats, scope="layer")
    with pytest.raises(ValueError, match="lacks"):
        build_masks(tiny_gpt2(), stats)


def test_same_seed_bit_identical_masks():
    a = build_masks(tiny_llama(), probe(tiny_llama(), layers=2, **FAST))
    b = build_masks(tiny_llama(), probe(tiny_llama(), layers=2, **FAST))
    c = build_masks(tiny_llama(), probe(tiny_llama(), layers=2, seed=1, **FAST))
    assert list(a) == list(b)
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert not all(torch.equal(a[n], c[n]) for n in a)


def test_save_load_round_trip_and_refusal(tmp_path):
    from safetensors import safe_open

    model = tiny_llama()
    masks = build_masks(model, probe(model, layers=1, **FAST), rho=0.1)
    path = tmp_path / "masks.safetensors"
    masks.save(path)
    with safe_open(str(path), framework="pt") as fh:
        meta = fh.metadata()
    for key in ("format_version", "rho", "scope", "n_samples", "n_rademacher", "estimator",
                "seed", "model_name", "config_hash", "dowser_version"):
        assert key in meta, key
    assert json.loads(meta["dowser"])["rho"] == 0.1
    back = MaskSet.load(path, model=model)
    assert list(back) == list(masks) and back.shapes == masks.shapes
    assert all(torch.equal(back[n], masks[n]) for n in masks)
    assert back.metadata["config_hash"] == masks.metadata["config_hash"]
    assert set(back.score_samples) == set(masks)
    assert "trainable" in back.summary() and "model.layers.1.mlp.up_proj.weight" in back.summary()
    with pytest.raises(ValueError, match=r"model\.layers\.1\.self_attn\.q_proj\.weight"):
        MaskSet.load(path, model=tiny_llama(hidden=48))
    with pytest.raises(ValueError, match=r"no parameter 'model\.layers\.1"):
        MaskSet.load(path, model=tiny_llama(n_layers=1))
    not_masks = tmp_path / "stats.safetensors"
    probe(model, layers=1, **FAST).save(not_masks)
    with pytest.raises(ValueError, match="not a dowser mask file"):
        MaskSet.load(not_masks)


def test_prepare_freezes_outside_tuned_layers():
    model = tiny_llama(n_layers=3)
    masks = prepare(model, rho=0.2, layers=2, **FAST)
    for name, p in model.named_parameters():
        tuned = name.startswith("model.layers.1.") or name.startswith("model.layers.2.")
        assert p.requires_grad == tuned, name
    assert sorted(masks) == sorted(n for n, p in model.named_parameters()
                                   if p.requires_grad and p.dim() == 2)


def test_cli_probe_and_inspect(tmp_path, capsys):
    from dowser import cli

    model = tiny_llama()
    model_dir = tmp_path / "tiny"
    model.save_pretrained(model_dir)
    out = tmp_path / "m.safetensors"
    assert cli.main(["probe", str(model_dir), "--layers", "1", "--rho", "0.1", "--out", str(out),
                     "--n-samples", "2", "--batch-size", "2", "--n-rademacher", "2",
                     "--seq-len", "8", "--no-progress"]) == 0
    masks = MaskSet.load(out, model=model)
    assert len(masks) == 7 and masks.metadata["n_samples"] == 2
    png = tmp_path / "m.png"
    assert cli.main(["inspect", str(out), "--plot", str(png)]) == 0
    text = capsys.readouterr().out
    assert "model.layers.1.mlp.down_proj.weight" in text
    assert png.exists() and png.stat().st_size > 1000
    assert cli.main(["info"]) == 0  # the existing commands are still there
