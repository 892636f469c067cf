"""dowser.probe: targets, synthetic prompts, the Rademacher estimator and its bookkeeping."""

from __future__ import annotations

import math

import pytest
import torch

from dowser import reference
from dowser.probe import ProbeStats, find_targets, probe, rademacher, synthetic_prompts
from tests.models import ARCHITECTURES, tiny_gpt2, tiny_llama, tiny_llava, tiny_mlp

FAST = dict(n_rademacher=2, seq_len=10, progress=False)

EXPECTED = {
    "llama": ("model.layers.{i}.", ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                    "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj",
                                    "mlp.down_proj"]),
    "gpt2": ("transformer.h.{i}.", ["attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"]),
    "llava": ("model.language_model.layers.{i}.", None),
    "qwen2_vl": ("model.language_model.layers.{i}.", None),
    "idefics3": ("model.text_model.layers.{i}.", None),
    "qwen2": ("model.layers.{i}.", None),
    "gemma3": ("model.layers.{i}.", None),
}


# ------------------------------------------------------------------ targets

@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_targets_per_architecture(arch):
    model = ARCHITECTURES[arch](n_layers=3)
    prefix, suffixes = EXPECTED[arch]
    suffixes = suffixes or EXPECTED["llama"][1]
    got = find_targets(model, layers=2)
    want = [prefix.format(i=i) + s for i in (1, 2) for s in suffixes]
    assert sorted(got) == sorted(want)
    assert set(got.values()) == {"text"}
    assert len(find_targets(model)) == 3 * len(suffixes)  # default: every decoder layer
    stats = probe(model, layers=1, n_samples=2, batch_size=2, **FAST)
    assert sorted(stats) == sorted(prefix.format(i=2) + s for s in suffixes)
    for e in stats.values():
        assert e.out_factors.dtype == e.in_factors.dtype == torch.float32
        assert e.out_factors.shape[0] == e.in_factors.shape[0] == 1
        assert torch.isfinite(e.out_factors).all() and (e.out_factors > 0).any()
        assert (e.in_factors > 0).any()


def test_targets_explicit_and_errors():
    model = tiny_llama()
    assert list(find_targets(model, targets=["model.layers.0.mlp.up_proj"])) == \
        ["model.layers.0.mlp.up_proj"]
    got = find_targets(model, targets=r"layers\.1\..*(q|k)_proj$")
    assert sorted(got) == ["model.layers.1.self_attn.k_proj", "model.layers.1.self_attn.q_proj"]
    with pytest.raises(ValueError, match="no module named"):
        find_targets(model, targets=["model.layers.9.mlp.up_proj"])
    with pytest.raises(ValueError, match="not a linear layer"):
        find_targets(model, targets=["model.layers.0.mlp"])
    with pytest.raises(ValueError, match="matches no linear"):
        find_targets(model, targets="nothing_here")
    for bad in (0, 3, -1, 1.5, True):
        with pytest.raises(ValueError, match="layers"):
            find_targets(model, layers=bad)
    with pytest.raises(ValueError, match="pass targets"):
        find_targets(torch.nn.Sequential(torch.nn.Linear(3, 3)))
    with pytest.raises(ValueError, match="estimator"):
        probe(model, estimator="l3")
    with pytest.raises(ValueError, match="n_rademacher"):
        probe(model, n_rademacher=0)
    with pytest.raises(ValueError, match="no multimodal projector"):
        find_targets(model, include_projector=True)


def test_multimodal_extras_and_boundary_rule():
    model = tiny_llava(n_layers=2)
    roles = find_targets(model, layers=1, include_projector=True, include_vision=True,
                         include_lm_head=True)
    assert roles["model.multi_modal_projector.linear_1"] == "projector"
    assert roles["model.multi_modal_projector.linear_2"] == "projector"
    assert roles["lm_head"] == "lm_head"
    assert any(r == "vision" and n.startswith("model.vision_tower.") for n, r in roles.items())
    stats = probe(model, layers=1, n_samples=2, batch_size=2, include_projector=True,
                  include_lm_head=True, include_vision=True, **FAST)
    lin1 = stats["model.multi_modal_projector.linear_1"]
    assert torch.equal(lin1.in_factors, torch.ones_like(lin1.in_factors))  # boundary rule
    assert (lin1.out_factors > 0).all()  # noise images reach the projector
    assert (stats["model.multi_modal_projector.linear_2"].in_factors > 0).any()
    head = stats["lm_head"]
    assert torch.equal(head.out_factors, torch.ones_like(head.out_factors))
    vis = [e for n, e in stats.items() if n.startswith("model.vision_tower.")]
    assert vis and all((e.out_factors > 0).any() for e in vis)
    # The language layers' statistics do not depend on whether the projector is probed
    # (lm_head probing keeps every position's logits, so only up to rounding).
    text_only = probe(model, layers=1, n_samples=2, batch_size=2, **FAST)
    for n, e in text_only.items():
        torch.testing.assert_close(e.out_factors, stats[n].out_factors, rtol=1e-5, atol=0)
    # Unsupported image probes: a clear error before any work.
    qwen = ARCHITECTURES["qwen2_vl"]()
    with pytest.raises(ValueError, match="Llava-style models only"):
        probe(qwen, layers=1, n_samples=2, batch_size=2, include_projector=True, **FAST)


# ------------------------------------------------------------------ prompts and draws

def test_synthetic_prompts_reproducible_and_shaped():
    model = tiny_llama()
    a = synthetic_prompts(model, batch=3, n_rows=4, seq_len=20, seed=7)
    b = synthetic_prompts(model, batch=3, n_rows=4, seq_len=20, seed=7)
    c = synthetic_prompts(model, batch=4, n_rows=4, seq_len=20, seed=7)
    assert a.shape == (4, 20) and a.dtype == torch.long
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert (a[:, 0] == model.config.bos_token_id).all()
    assert (a >= 0).all() and (a < model.config.vocab_size).all()
    x = rademacher(0, 1, 3, 2, 11)
    assert x.shape == (3, 2, 11) and set(x.unique().tolist()) <= {-1.0, 1.0}
    assert torch.equal(x, rademacher(0, 1, 3, 2, 11))
    assert not torch.equal(x, rademacher(0, 2, 3, 2, 11))


def test_synthetic_prompt_seeds_replace_specials_by_bos():
    """The 1-5 random seed ids after BOS hold no special id: each one drawn is replaced by BOS
    (the draws are replayed from (seed, batch) to know which)."""
    from dowser.probe.draws import derive_seed
    from dowser.probe.prompts import MAX_SEED_TOKENS, special_ids

    model = tiny_llama()  # vocabulary 97: specials come up often among 64 x n seed draws
    bos, eos, pad, special, vocab = special_ids(model, None)
    assert {bos, eos} <= special and len(special) >= 2
    for batch in range(3):
        ids = synthetic_prompts(model, batch=batch, n_rows=64, seq_len=8, seed=5)
        gen = torch.Generator().manual_seed(derive_seed(5, batch, "prompt"))
        n_seed = int(torch.randint(1, MAX_SEED_TOKENS + 1, (1,), generator=gen))
        raw = torch.randint(0, vocab, (64, n_seed), generator=gen)
        was_special = torch.isin(raw, torch.tensor(sorted(special)))
        assert was_special.any(), "the premise: some seed draw hit a special id"
        seeds = ids[:, 1:1 + n_seed]
        assert torch.equal(seeds, torch.where(was_special, torch.full_like(raw, bos), raw))
        assert not torch.isin(seeds, torch.tensor(sorted(special - {bos}))).any()


def test_sampler_matches_transformers_logits_processors():
    """warp_logits is transformers' repetition penalty, temperature and top-p, bit for bit."""
    from transformers import (RepetitionPenaltyLogitsProcessor, TemperatureLogitsWarper,
                              TopPLogitsWarper)

    from dowser.probe.prompts import REPETITION_PENALTY, TEMPERATURE, TOP_P, warp_logits

    hf = [RepetitionPenaltyLogitsProcessor(REPETITION_PENALTY), TemperatureLogitsWarper(TEMPERATURE),
          TopPLogitsWarper(TOP_P)]
    gen = torch.Generator().manual_seed(0)
    cases = [
        (torch.randn(4, 97, generator=gen) * 3, torch.randint(0, 97, (4, 9), generator=gen)),
        # peaked: top-p keeps a single token; repeated ids in the history
        (torch.randn(3, 50, generator=gen).index_fill_(1, torch.tensor([7]), 40.0),
         torch.tensor([[7, 7, 7], [1, 7, 1], [0, 49, 0]])),
        # ties and all-negative logits (the penalty multiplies them)
        (-torch.randint(1, 4, (2, 64), generator=gen).float(),
         torch.randint(0, 64, (2, 30), generator=gen)),
        # a flat distribution: top-p drops about a tenth
        (torch.zeros(2, 1000), torch.tensor([[3, 999], [0, 0]])),
    ]
    for logits, ids in cases:
        expected = logits.clone()
        for proc in hf:
            expected = proc(ids, expected)
        got = warp_logits(ids, logits.clone())
        assert torch.equal(got, expected)
        assert torch.isinf(got).any() or logits.shape[1] == 97  # top-p did cut something


def test_probe_triggers_no_deprecation_warnings():
    """Our calls into transformers (prompt generation with a KV cache, the probing pass) use
    its current names: no FutureWarning / DeprecationWarning, no deprecation log line."""
    import logging
    import warnings

    from transformers.utils import logging as hf_logging

    records = []

    class Keep(logging.Handler):
        def emit(self, record):
            records.append(record.getMessage())

    hf_logger = hf_logging.get_logger("transformers")
    handler = Keep(level=logging.WARNING)
    hf_logger.addHandler(handler)
    # warning_once remembers what it printed: forget it, so an earlier test cannot hide it
    once = getattr(logging.Logger, "warning_once", None)
    if hasattr(once, "cache_clear"):
        once.cache_clear()
    try:
        for make in (tiny_llama, tiny_gpt2):
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                probe(make(), layers=1, n_samples=2, batch_size=2, **FAST)
            bad = [f"{w.category.__name__}: {w.message}" for w in caught
                   if issubclass(w.category, (FutureWarning, DeprecationWarning))]
            assert not bad, bad
    finally:
        hf_logger.removeHandler(handler)
    assert not [r for r in records if "deprecat" in r.lower()], records


def test_batches_depend_on_seed_and_index_only():
    model = tiny_llama()
    kw = dict(layers=1, n_samples=10, batch_size=4, n_rademacher=2, seq_len=8, seed=3,
              progress=False)
    full = probe(model, **kw)
    again = probe(model, **kw)
    shuffled = probe(model, only_batches=[2, 0, 1], **kw)
    alone = probe(model, only_batches=[1], **kw)
    for n, e in full.items():
        assert torch.equal(e.out_factors, again[n].out_factors)
        assert torch.equal(e.in_factors, again[n].in_factors)
        assert torch.equal(e.out_factors[[2, 0, 1]], shuffled[n].out_factors)
        assert torch.equal(e.in_factors[1:2], alone[n].in_factors)
        assert torch.equal(e.out_factors[1:2], alone[n].out_factors)
        assert e.batch_weights.tolist() == [4.0, 4.0, 2.0]
    other = probe(model, **{**kw, "seed": 4})
    assert not torch.equal(next(iter(other.values())).out_factors,
                           next(iter(full.values())).out_factors)


# ------------------------------------------------------------------ the estimator

def _exact_jacobian_norms(model, ids, names):
    """sqrt(mean over rows/tokens of ||J||^2) and mean ||J|| per output feature of each target,
    J = d(logits[:, -1] / n_rows)/dz, by one backward per logit (exact, fp64)."""
    mods = dict(model.named_modules())
    zs = {}
    hooks = [mods[n].register_forward_hook(lambda m, a, o, n=n: zs.__setitem__(n, o))
             for n in names]
    with torch.enable_grad():
        for p in model.parameters():
            p.requires_grad_(True)
        out = model(input_ids=ids)
        for h in hooks:
            h.remove()
        f = (out.logits if hasattr(out, "logits") else out)[:, -1, :] / ids.shape[0]
        sq = {n: torch.zeros_like(zs[n]) for n in names}
        for s in range(f.shape[0]):
            for v in range(f.shape[1]):
                gs = torch.autograd.grad(f[s, v], [zs[n] for n in names], retain_graph=True,
                                         allow_unused=True)
                for n, g in zip(names, gs):
                    if g is not None:
                        sq[n] += g * g
    l2 = {n: sq[n].reshape(-1, sq[n].shape[-1]).mean(0).sqrt() for n in names}
    l1 = {n: sq[n].sqrt().reshape(-1, sq[n].shape[-1]).mean(0) for n in names}
    return l2, l1


@pytest.mark.parametrize("which", ["mlp", "llama"])
def test_estimator_matches_exact_jacobian(which):
    if which == "mlp":
        model = tiny_mlp(dtype=torch.float64)
        names = ["fc1", "fc2"]
        ids = torch.tensor([[1, 5, 7], [3, 2, 11]])
    else:
        model = tiny_llama(n_layers=2, hidden=16, intermediate=24, vocab=29,
                           dtype=torch.float64)
        # a layer-0 and a layer-1 attention and MLP matrix (all 14 would only cost time)
        names = ["model.layers.0.self_attn.q_proj", "model.layers.0.mlp.gate_proj",
                 "model.layers.1.self_attn.v_proj", "model.layers.1.mlp.down_proj"]
        ids = torch.tensor([[1, 5, 7, 9, 4], [1, 3, 2, 11, 8]])
    l2_exact, l1_exact = _exact_jacobian_norms(model, ids, names)
    common = dict(prompts=ids, n_rademacher=2000, batch_size=2, progress=False,
                  targets=names)
    l2 = probe(model, estimator="l2", **common)
    l1 = probe(model, estimator="l1", **common)
    for n in names:
        exact2, exact1 = l2_exact[n].float(), l1_exact[n].float()
        live = exact2 > 1e-6 * exact2.max()
        assert live.any()
        est2 = l2[n].out_factors[0]
        est1 = l1[n].out_factors[0]
        assert torch.all((est2[live] / exact2[live] - 1).abs() < 0.05), n
        # Khintchine: E|xi^T J| in [1/sqrt2, 1] * ||J|| (per row/token, so also for the mean);
        # 1% slack for the Monte Carlo error of 2000 draws.
        ratio = est1[live] / exact1[live]
        assert ratio.min() >= 1 / math.sqrt(2) - 0.01 and ratio.max() <= 1.01, n
        assert torch.all(est2[~live] < 1e-6) and torch.all(est1[~live] < 1e-6)


def _authors_inputs(model, n_samples, batch_size, seq_len, seed, R):
    batches, xis = [], []
    for b in range(math.ceil(n_samples / batch_size)):
        rows = min(batch_size, n_samples - b * batch_size)
        ids = synthetic_prompts(model, batch=b, n_rows=rows, seq_len=seq_len, seed=seed)
        batches.append({"input_ids": ids, "attention_mask": torch.ones_like(ids)})
        vocab = model.get_output_embeddings().weight.shape[0]
        xis.append(torch.randint(0, 2, (R, rows, vocab),
                                 generator=torch.Generator().manual_seed(100 + b)).float() * 2 - 1)
    return batches, xis


@pytest.mark.parametrize("arch,estimator", [("llama", "l1"), ("llama", "l2"), ("gpt2", "l1")])
def test_equivalent_to_authors_loop(arch, estimator):
    model = tiny_llama() if arch == "llama" else tiny_gpt2()
    R, n, bs, T, seed = 3, 6, 4, 12, 5
    batches, xis = _authors_inputs(model, n, bs, T, seed, R)
    stats = probe(model, n_samples=n, batch_size=bs, n_rademacher=R, seq_len=T,
                  estimator=estimator, seed=seed, progress=False,
                  draws=lambda b, r, rows, vocab: xis[b])
    theirs = reference.authors_probe_loop(model, batches, list(stats), xis, estimator)
    mods = dict(model.named_modules())
    for name, entry in stats.items():
        w = mods[name].weight
        ours = entry.scores(w.T if arch == "gpt2" else w)
        torch.testing.assert_close(ours.float(), theirs[name], rtol=1e-5, atol=1e-12)
    # masks: ours from the factors through dowser.ops.build_mask (over the weight as stored),
    # theirs by sorting the dense score matrix, transposed to GPT-2's stored layout
    from dowser import build_masks
    masks = build_masks(model, stats, rho=0.1)
    for name in stats:
        dense = theirs[name].T if arch == "gpt2" else theirs[name]
        k = int(math.floor(0.1 * dense.numel() + 0.5))
        want, _ = reference.select_from_scores(dense.contiguous(), k)
        assert torch.equal(masks[name + ".weight"], want), name
    assert all(p.grad is None for p in model.parameters())


# ------------------------------------------------------------------ bookkeeping

def test_state_restored_no_grads_and_hooks_removed_on_error():
    model = tiny_llama()
    model.train()
    model.model.embed_tokens.weight.requires_grad_(False)
    before = {n: p.requires_grad for n, p in model.named_parameters()}
    probe(model, layers=1, n_samples=2, batch_size=2, **FAST)
    assert model.training
    assert {n: p.requires_grad for n, p in model.named_parameters()} == before
    assert all(p.grad is None for p in model.parameters())

    def boom(*a):
        raise RuntimeError("xi exploded")
    with pytest.raises(RuntimeError, match="xi exploded"):
        probe(model, layers=1, n_samples=2, batch_size=2, n_rademacher=2, seq_len=8,
              progress=False, draws=boom)
    assert model.training
    assert {n: p.requires_grad for n, p in model.named_parameters()} == before
    assert all(not m._forward_hooks for m in model.modules())


def test_bf16_model_matches_fp32():
    m32 = tiny_llama()
    m16 = tiny_llama(dtype=torch.bfloat16)
    kw = dict(layers=2, n_samples=4, batch_size=4, n_rademacher=4, seq_len=10, progress=False,
              prompts=torch.randint(3, 90, (4, 10), generator=torch.Generator().manual_seed(0)))
    s32, s16 = probe(m32, **kw), probe(m16, **kw)
    for n in s32:
        assert s16[n].out_factors.dtype == torch.float32
        for f in ("out_factors", "in_factors"):
            a, b = getattr(s32[n], f).flatten(), getattr(s16[n], f).flatten()
            assert torch.isfinite(b).all()
            assert torch.corrcoef(torch.stack([a, b]))[0, 1] > 0.95, (n, f)


def test_real_data_modes_and_progress(capsys):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    model = tiny_llama()
    words = ["<pad>", "<s>", "</s>", "<unk>"] + [f"w{i}" for i in range(40)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                 pad_token="<pad>", unk_token="<unk>")
    texts = ["w1 w2 w3 w4", "w5 w6", "w7 w8 w9 w10 w11", "w12"]
    s_text = probe(model, hf, prompts=texts, layers=1, batch_size=3, **FAST)
    assert s_text.metadata["mode"] == "prompts"
    assert s_text.metadata["n_samples"] == 4
    assert next(iter(s_text.values())).batch_weights.tolist() == [3.0, 1.0]
    # left padding: a padded batch equals its sequences probed on their own (mask-weighted)
    alone = probe(model, hf, prompts=texts[1:2], layers=1, batch_size=1, **FAST)
    ids = hf(texts[1:2], return_tensors="pt")["input_ids"]
    as_ids = probe(model, prompts=ids, layers=1, batch_size=1, **FAST)
    for n in alone:
        torch.testing.assert_close(alone[n].in_factors, as_ids[n].in_factors)
    loader = [{"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}]
    s_dl = probe(model, dataloader=loader, layers=1, **FAST)
    assert s_dl.metadata["mode"] == "dataloader"
    for n in s_dl:
        torch.testing.assert_close(s_dl[n].in_factors, as_ids[n].in_factors)
    with pytest.raises(ValueError, match="tokenizer"):
        probe(model, prompts=texts, **FAST)
    with pytest.raises(ValueError, match="not both"):
        probe(model, prompts=ids, dataloader=loader, **FAST)
    capsys.readouterr()
    probe(model, layers=1, n_samples=2, batch_size=2, n_rademacher=1, seq_len=6, progress=False)
    assert "dowser probe" not in capsys.readouterr().err
    probe(model, layers=1, n_samples=2, batch_size=2, n_rademacher=1, seq_len=6, progress=True)
    assert "dowser probe" in capsys.readouterr().err


def test_probe_stats_save_load(tmp_path):
    model = tiny_llama()
    stats = probe(model, layers=1, n_samples=2, batch_size=2, **FAST)
    path = tmp_path / "stats.safetensors"
    stats.save(path)
    back = ProbeStats.load(path, model=model)
    assert list(back) == list(stats)
    for n in stats:
        assert torch.equal(back[n].out_factors, stats[n].out_factors)
        assert torch.equal(back[n].in_factors, stats[n].in_factors)
        assert torch.equal(back[n].batch_weights, stats[n].batch_weights)
    assert back.metadata["seed"] == 0 and back.metadata["estimator"] == "l1"
    assert back.metadata["format_version"] == 1
    other = tiny_llama(hidden=48)
    with pytest.raises(ValueError, match="model.layers.1.self_attn.q_proj"):
        ProbeStats.load(path, model=other)
    with pytest.raises(ValueError, match="no linear layer named"):
        ProbeStats.load(path, model=tiny_gpt2())
