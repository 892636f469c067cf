"""dowser.plan_memory / `dowser plan`: counts from a config on the meta device, checked against
real models; the state formulas; verdicts; bad input."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

import dowser
from dowser import cli
from dowser.plan import GiB, count_model, plan_memory

TINY = dict(model_type="llama", hidden_size=96, intermediate_size=200, num_hidden_layers=3,
            num_attention_heads=4, num_key_value_heads=2, vocab_size=300,
            max_position_embeddings=128, tie_word_embeddings=False)


def _real(dtype=torch.float32, **over):
    from transformers import AutoConfig, AutoModelForCausalLM

    d = dict(TINY, **over)
    cfg = AutoConfig.for_model(d.pop("model_type"), **d)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg, dtype=dtype)


def test_counts_match_a_real_model():
    model = _real()
    counts, _, _ = count_model(TINY, layers="all", dtype="fp32")
    assert counts.n_params == sum(p.numel() for p in model.parameters())
    layer_params = sum(p.numel() for layer in model.model.layers for p in layer.parameters())
    assert counts.trainable == layer_params
    assert len(counts.masked) == 3 * 7 and sum(counts.masked) == sum(
        m.weight.numel() for n, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and ".layers." in n)
    last2, _, _ = count_model(TINY, layers=2, dtype="fp32")
    assert last2.trainable == layer_params * 2 // 3 and last2.tuned_layers == 2


def test_llama2_7b_parameter_count():
    from tests.conftest import source_path

    counts, _, _ = count_model(source_path("bench", "configs", "llama-2-7b.json"), dtype="bf16")
    assert counts.n_params == 6_738_415_616  # the published Llama-2-7B count
    assert counts.n_layers == 32 and len(counts.masked) == 224


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_saved_activations_match_a_real_cpu_forward(dtype):
    """The planner counts saved tensors on the meta device with flash-style attention; a real
    CPU forward (SDPA's CPU flash kernel) saves the same bytes, counted independently here."""
    from dowser.plan import _saved_bytes, meta_model, load_config

    model = _real(dtype)
    tuned = {id(p) for p in model.model.layers.parameters()}
    for p in model.parameters():  # the planner's trainable set: the decoder layers
        p.requires_grad_(id(p) in tuned)
    params = {p.untyped_storage()._cdata for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        key = t.untyped_storage()._cdata
        if key not in params:
            seen[key] = t.untyped_storage().nbytes()
        return t

    ids = torch.randint(0, 300, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(input_ids=ids, labels=ids)
    real = sum(seen.values())
    counts, meta, layers = count_model(TINY, dtype=dtype)
    per_layer, outside = _saved_bytes(meta, 2, 40, layers)
    assert sum(per_layer) + outside == real
    # the rotary cos/sin are shared by every layer: the first one to save them counts them
    assert per_layer[1] == per_layer[2] > per_layer[0] > 0


MID = dict(TINY, hidden_size=256, intermediate_size=688, num_hidden_layers=4, vocab_size=1000)


def test_state_formulas_and_master_bytes():
    plan = plan_memory(MID, rho=0.1, dtype="bf16", batch=1, seq=128)
    counts = plan.counts
    k = sum(math.floor(0.1 * n + 0.5) for n in counts.masked)
    words = sum((n + 31) // 32 for n in counts.masked)
    dense = counts.trainable - sum(counts.masked)
    dow = plan.row("dowser (compact)")
    assert dow.parts["optimizer state"] == 12 * k + 4 * words + 12 * dense  # with fp32 master
    assert dow.parts["masks"] == 4 * words
    nomaster = plan_memory(MID, rho=0.1, dtype="bf16", batch=1, seq=128,
                           master_weights=False, optimizers=("dowser (compact)",))
    assert nomaster.rows[0].parts["optimizer state"] == 8 * k + 4 * words + 8 * dense
    assert plan.row("torch AdamW (fp32 master").parts["optimizer state"] == 12 * counts.trainable
    assert plan.row("torch AdamW (param").parts["optimizer state"] == 4 * counts.trainable
    sib = plan.row("dowser (compact, step_in_backward)")
    assert sib.parts["gradients"] == counts.largest_param * 2
    assert dow.parts["gradients"] == counts.trainable * 2
    # per trainable-layer parameter: about 1.2 + 0.125 B of dowser state against 12 (fp32 AdamW)
    assert 1.3 < dow.parts["optimizer state"] / counts.trainable < 1.4
    fp32 = plan_memory(MID, dtype="fp32", batch=1, seq=128)
    assert fp32.row("dowser (compact)").parts["optimizer state"] == 8 * k + 4 * words + 8 * dense
    assert all("fp32 master" not in r.optimizer for r in fp32.rows)


def test_verdicts_checkpointing_and_sharding():
    cfg = MID
    plan = plan_memory(cfg, batch=4, seq=1024, gpu_mem=24)
    for opt in ("torch AdamW (param", "dowser (compact)"):
        off, on = plan.row(opt, False), plan.row(opt, True)
        assert on.parts["activations"] < off.parts["activations"]
    for r in plan.rows:
        assert r.fits == (r.peak <= 24 * GiB)
        assert r.headroom == pytest.approx(24 * GiB - r.peak)
    big = plan_memory(cfg, batch=4, seq=1024, gpu_mem=1e4)
    assert all(r.fits for r in big.rows)
    tiny = plan_memory(cfg, batch=4, seq=1024, gpu_mem=0.01)
    assert not any(r.fits for r in tiny.rows)
    multi = plan_memory(cfg, batch=4, seq=1024, gpus=4)
    assert {r.parallel for r in multi.rows} == {"DDP", "FSDP2"}
    assert not any("step_in_backward" in r.optimizer for r in multi.rows)
    single = plan.row("dowser (compact)")
    ddp = multi.row("dowser (compact)", parallel="DDP")
    fsdp = multi.row("dowser (compact)", parallel="FSDP2")
    assert ddp.parts["optimizer state"] == single.parts["optimizer state"]
    assert fsdp.parts["optimizer state"] == pytest.approx(single.parts["optimizer state"] / 4)
    assert fsdp.parts["weights"] < ddp.parts["weights"]
    assert "fits in 24 GiB" in plan.table() and "|" in str(plan)
    assert json.loads(json.dumps(plan.to_dict()))["rows"][0]["optimizer"]
    assert plan.probe_peak > plan.rows[0].parts["weights"]


def test_one_row_peak_and_the_probe_peak_by_hand():
    """The peak of one row and the probing peak recomputed here from the counts and the
    activation bytes (checked against a real forward above), term by term as the module
    docstring states them: the static bytes plus the larger end of the backward pass."""
    from dowser.plan import _saved_bytes

    batch, seq = 2, 256
    plan = plan_memory(MID, rho=0.1, dtype="bf16", batch=batch, seq=seq, gpu_mem=24)
    c = plan.counts
    e, tokens = 2, batch * seq
    k = sum(math.floor(0.1 * n + 0.5) for n in c.masked)
    words = sum((n + 31) // 32 for n in c.masked)
    dense = c.trainable - sum(c.masked)
    weights, masks, overhead = c.n_params * e, 4 * words, 1 * GiB  # cuda: 1 GiB of overhead
    state = 12 * k + 4 * words + 12 * dense  # m, v and the fp32 master per trainable entry
    grads = c.trainable * e
    _, meta, layers = count_model(MID, dtype="bf16")
    per_layer, outside = _saved_bytes(meta, batch, seq, layers)
    acts = sum(per_layer) + outside + tokens * c.vocab * e  # + the returned logits
    logit_grads = tokens * c.vocab * (8 + e)  # fp32 gradient, its cast and the fp32 upcast's
    layer_bwd = 3 * tokens * max(c.intermediate, c.hidden) * e + 2 * tokens * c.hidden * 4
    step_tmp = 2 * c.largest_param * 4
    want = weights + state + masks + overhead + max(acts + max(logit_grads, layer_bwd),
                                                    grads + layer_bwd, grads + step_tmp)
    row = plan.row("dowser (compact)")
    assert row.peak == want
    assert row.fits == (want <= 24 * GiB) and row.headroom == 24 * GiB - want
    p_layer, p_outside = _saved_bytes(meta, 4, 64, layers, probe=True)
    factors = sum(2 * 16 * (o + i) * 4 for o, i in
                  [(m.out_features, m.in_features) for n, m in meta.named_modules()
                   if isinstance(m, torch.nn.Linear) and ".layers." in n])
    assert plan.probe_peak == (weights + sum(p_layer) + p_outside + 4 * 64 * c.vocab * (e + 8)
                               + factors + overhead)


def test_plan_from_a_model_a_dict_and_a_directory(tmp_path):
    model = _real()
    a = plan_memory(model, dtype="fp32", batch=1, seq=16)
    b = plan_memory(TINY, dtype="fp32", batch=1, seq=16)
    model.config.save_pretrained(tmp_path)
    c = plan_memory(tmp_path, dtype="fp32", batch=1, seq=16)
    assert a.rows[0].peak == b.rows[0].peak == c.rows[0].peak
    assert dowser.plan_memory is plan_memory


@pytest.mark.parametrize("kwargs,match", [
    (dict(rho=1.5), "rho"), (dict(batch=0), "batch"), (dict(seq=2.5), "seq"),
    (dict(dtype="int8"), "dtype"), (dict(gpu_mem=-1), "gpu_mem"), (dict(gpus=0), "gpus"),
    (dict(layers=9), "layers"), (dict(parallel="zero3"), "parallel"),
    (dict(optimizers=("sgd",)), "optimizer")])
def test_bad_arguments_raise_one_line(kwargs, match):
    with pytest.raises(ValueError, match=match) as exc:
        plan_memory(TINY, **kwargs)
    assert "\n" not in str(exc.value)


def test_bad_sources(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        plan_memory(tmp_path / "nope.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="config JSON"):
        plan_memory(bad)
    with pytest.raises(ValueError, match="model_type"):
        plan_memory({"hidden_size": 8})
    with pytest.raises(ValueError, match="has no config.json"):
        plan_memory(tmp_path)


def test_cli_plan(capsys, tmp_path):
    cfg = str(tmp_path / "mid.json")
    Path(cfg).write_text(json.dumps(MID))
    assert cli.main(["plan", cfg, "--batch", "1", "--seq", "256", "--gpu-mem", "48", "--brief"]) == 0
    out = capsys.readouterr().out
    assert "fits in 48 GiB" in out and "dowser (compact, step_in_backward)" in out
    assert cli.main(["plan", cfg, "--batch", "1", "--seq", "64", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["settings"]["gpu_mem_gb"] == 80.0
    for argv, msg in [([str(tmp_path / "x.json")], "does not exist"),
                      ([cfg, "--rho", "-0.1"], "--rho"), ([cfg, "--batch", "0"], "--batch"),
                      ([cfg, "--layers", "some"], "--layers"), ([cfg, "--gpu-mem", "0"], "--gpu-mem"),
                      ([cfg, "--layers", "99"], "layers"), ([cfg, "--seq", "-3"], "--seq")]:
        assert cli.main(["plan"] + argv) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("dowser plan: error:") and msg in err and "\n" not in err
