"""dowser.build_masks(method=..., select=...): every scoring rule against a plain-PyTorch
reference written here (materialised scores, stable sort), bit for bit; exact k; ties; zeros;
rho = 0 / 1; all float dtypes and non-contiguous weights; both scopes; every selection backend;
random masks reproducible from (seed, name) in a fresh process; wanda's input norms against
activations hooked by hand."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch
from torch import nn

from dowser import MaskSet, ProbeEntry, ProbeStats, build_masks, probe, reference
from dowser import _keys, _registry, ops
from dowser.ops import popcount
from tests.models import tiny_gpt2, tiny_llama

FAST = dict(n_samples=2, batch_size=2, n_rademacher=2, seq_len=10, progress=False)
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _k(rho, n):
    return int(math.floor(rho * n + 0.5))


# ---- references: materialise every score, then a stable sort --------------------------------

def ref_scores(method: str, weight: torch.Tensor, entry: ProbeEntry | None, conv1d: bool = False,
               seed: int = 0, name: str = "") -> torch.Tensor:
    """The rule's fp32 scores (random: the uint32 hash keys as int64) of the weight AS STORED."""
    w = weight.detach()
    if method == "random":
        base = _keys.stream_base(seed, name)
        keys = _keys.hash_keys_reference(base, range(w.numel()))
        return torch.tensor(keys, dtype=torch.int64).view(w.shape)
    if method == "magnitude":
        return w.abs().to(torch.float32)
    if method == "wanda":
        norms = torch.sqrt((entry.in_sq.double() * entry.batch_weights.double()[:, None]).sum(0)
                           / entry.batch_weights.double().sum()).float()
        s = w.abs().to(torch.float32) * (norms[:, None] if conv1d else norms[None, :])
        return s
    psi, a, bw = entry.out_factors, entry.in_factors, entry.batch_weights
    if conv1d:
        psi, a = a, psi
    if all(torch.equal(t.float(), t.float().round()) for t in (w, psi, a, bw)) and \
            float(bw.sum()) in (1.0, 2.0, 4.0, 8.0, 16.0):
        # small integers and a power-of-two weight sum: every product and sum is exact in
        # fp32, so the plain-PyTorch reference is THE score, whatever the backend
        return reference.scores(w, psi, a, bw)
    # else the backend's own materialised scores (DESIGN.md §2: backends may differ from each
    # other in the last bits of a sum over B; each one's mask is the exact selection of its
    # scores)
    return ops.scores(w, psi, a, batch_weights=bw)


def ref_select(scores: list[torch.Tensor], k: int, highest: bool) -> list[torch.Tensor]:
    """k lowest (highest) scores of all matrices together, ties by list order then flat index."""
    keys = torch.cat([s.reshape(-1) if s.dtype == torch.int64 else reference.score_keys(s)
                      for s in scores])
    order = torch.sort(-keys if highest else keys, stable=True).indices
    flat = torch.zeros(keys.numel(), dtype=torch.bool)
    flat[order[:k]] = True
    out, start = [], 0
    for s in scores:
        out.append(reference.pack_mask(flat[start:start + s.numel()]))
        start += s.numel()
    return out


def ref_masks(model, stats, rho, method, select="lowest", scope="matrix", seed=0, targets=None):
    modules = dict(model.named_modules())
    names = list(targets if targets is not None else stats)
    scores = [ref_scores(method, modules[n].weight, stats[n] if stats is not None else None,
                         type(modules[n]).__name__ == "Conv1D", seed, n + ".weight")
              for n in names]
    highest = select == "highest"
    if scope == "global":
        packed = ref_select(scores, _k(rho, sum(s.numel() for s in scores)), highest)
    else:
        packed = [ref_select([s], _k(rho, s.numel()), highest)[0] for s in scores]
    return {n + ".weight": p for n, p in zip(names, packed)}


def assert_same(masks: MaskSet, ref: dict[str, torch.Tensor]):
    assert list(masks) == list(ref)
    for name, packed in ref.items():
        assert torch.equal(masks[name].cpu(), packed), name


# ---- an awkward model: odd shapes, a 1x1, non-contiguous weights, ties and zeros -------------

class Awkward(nn.Module):
    SHAPES = [(37, 101), (1, 1), (3, 65), (64, 32), (5, 7)]

    def __init__(self, dtype=torch.float32, ties=False, contiguous=True, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.layers = nn.ModuleList()
        for i, (o, d) in enumerate(self.SHAPES):
            lin = nn.Linear(d, o, bias=False)
            w = torch.randn(o, d, generator=g)
            if ties:  # small integers: heavy ties, exact zeros, signs
                w = torch.randint(-3, 4, (o, d), generator=g).float()
            if i == 3:
                w[:5] = 0.0  # whole zero rows
            w = w.to(dtype)
            if not contiguous:
                w = w.t().contiguous().t()  # same values, column-major strides
            lin.weight = nn.Parameter(w)
            self.layers.append(lin)

    def names(self):
        return [f"layers.{i}" for i in range(len(self.SHAPES))]


def awkward_stats(model: Awkward, seed=0, ties=False) -> ProbeStats:
    """Hand-made statistics (B = 3) with ties and zeros in the factors."""
    g = torch.Generator().manual_seed(100 + seed)
    entries = {}
    bw = torch.tensor([1.0, 3.0, 4.0])
    for n, (o, d) in zip(model.names(), model.SHAPES):
        if ties:
            psi = torch.randint(0, 3, (3, o), generator=g).float()
            a = torch.randint(0, 3, (3, d), generator=g).float()
            sq = torch.randint(0, 4, (3, d), generator=g).float()
        else:
            psi, a, sq = (torch.rand(3, x, generator=g) for x in (o, d, d))
            a[:, :2] = 0.0
            sq[:, :1] = 0.0
        entries[n] = ProbeEntry(psi, a, bw.clone(), sq)
    return ProbeStats(entries, {"seed": 7, "n_samples": 8})


METHODS = ["dowser", "magnitude", "wanda", "random"]


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("select", ["lowest", "highest"])
@pytest.mark.parametrize("scope", ["matrix", "global"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_every_rule_matches_reference(method, select, scope, dtype):
    for ties, contiguous in ((False, True), (True, False)):
        model = Awkward(dtype, ties=ties, contiguous=contiguous)
        stats = awkward_stats(model, ties=ties)
        for rho in (0.0, 0.1, 0.5, 0.93, 1.0):
            masks = build_masks(model, stats, rho, scope=scope, method=method, select=select,
                                seed=3)
            assert_same(masks, ref_masks(model, stats, rho, method, select, scope, seed=3))
            counts = masks.counts()
            if scope == "matrix":
                assert all(t == _k(rho, n) for t, n in counts.values())
            else:
                assert sum(t for t, _ in counts.values()) == _k(
                    rho, sum(n for _, n in counts.values()))
            assert (masks.metadata["method"], masks.metadata["select"],
                    masks.metadata["seed"]) == (method, select, 3)


def _select_backends():
    return sorted(_registry.implementations("select_mask", "cpu"))


@pytest.mark.parametrize("backend", _select_backends())
@pytest.mark.parametrize("method", ["dowser", "magnitude", "wanda"])
def test_every_backend_gives_the_reference_masks(backend, method, monkeypatch):
    # negated factors (select="highest") and rank-1 factors of ones go through every kernel
    monkeypatch.setenv("DOWSER_BACKEND", backend)
    model = Awkward(torch.bfloat16, ties=True, contiguous=False)
    stats = awkward_stats(model, ties=True)
    for select in ("lowest", "highest"):
        for scope in ("matrix", "global"):
            masks = build_masks(model, stats, 0.3, scope=scope, method=method, select=select)
            assert_same(masks, ref_masks(model, stats, 0.3, method, select, scope))


def test_constant_layer_highest_takes_the_first_entries():
    model = Awkward()
    for lin in model.layers:
        nn.init.constant_(lin.weight, 0.5)
    for select in ("lowest", "highest"):
        masks = build_masks(model, None, 0.25, method="magnitude", select=select,
                            targets=model.names())
        bits = reference.unpack_mask(masks["layers.0.weight"], 37 * 101)
        k = _k(0.25, 37 * 101)
        assert bits[:k].all() and not bits[k:].any()


def test_conv1d_rules_use_the_stored_layout():
    model = tiny_gpt2()
    stats = probe(model, layers=1, **FAST)
    for method in METHODS:
        for select in ("lowest", "highest"):
            masks = build_masks(model, stats, 0.25, method=method, select=select)
            assert_same(masks, ref_masks(model, stats, 0.25, method, select))


def test_llama_rules_match_reference_global():
    model = tiny_llama()
    stats = probe(model, layers=1, **FAST)
    for method in METHODS:
        masks = build_masks(model, stats, 0.2, scope="global", method=method)
        assert_same(masks, ref_masks(model, stats, 0.2, method, scope="global"))


# ---- random: the hash, the chunked selection, reproducibility --------------------------------

def test_hash_matches_python_integers():
    for seed, name in ((0, "w"), (2**40 + 3, "model.layers.0.mlp.up_proj.weight"), (-5, "é")):
        base = _keys.stream_base(seed, name)
        for start in (0, 12345, 2**33 - 7):
            got = _keys.hash_keys(base, start, start + 300)
            assert got.tolist() == _keys.hash_keys_reference(base, range(start, start + 300))
        idx = torch.tensor([5, 0, 2**31 + 1, 17])
        assert _keys.hash_keys_at(base, idx).tolist() == _keys.hash_keys_reference(base, idx.tolist())


@pytest.mark.parametrize("bin_limit", [1 << 20, 16])  # collect the bin / a third pass
def test_chunked_key_selection_with_heavy_ties(bin_limit, monkeypatch):
    monkeypatch.setattr(_keys, "CHUNK", bin_limit)
    g = torch.Generator().manual_seed(0)

    def source(p):
        return lambda: iter(p.split(64))  # chunks of 64 (multiples of 32, as CHUNK is)

    heavy = [torch.randint(0, 5, (n,), generator=g) * 65537 for n in (1000, 33, 1, 0, 517)]
    spread = [torch.randint(0, 2**32, (n,), generator=g) for n in (700, 65, 0, 300)]
    spread[1][:10] = spread[0][:10]  # a few ties across matrices
    spread[0][100:110] = spread[0][5]  # and within one
    for parts in (heavy, spread):
        numels = [p.numel() for p in parts]
        for k in sorted({0, 1, 7, 400, sum(numels) // 2, sum(numels) - 1, sum(numels)}):
            got, stats = _keys.select_lowest([source(p) for p in parts], numels, k)
            want = ref_select([p for p in parts], k, highest=False)
            assert all(torch.equal(a, b) for a, b in zip(got, want)), k
            assert sum(popcount(m) for m in got) == k
            if k:
                below = sum(int((p < stats[0]).sum()) for p in parts)
                assert int(stats[1]) == below and int(stats[1] + stats[2]) == k
                assert int(stats[0]) == int(torch.cat(parts).sort().values[k - 1])
    with pytest.raises(ValueError, match="k must be"):
        _keys.select_lowest([source(p) for p in heavy], [p.numel() for p in heavy], 1552)


def test_random_without_stats_and_chunk_boundaries(monkeypatch):
    monkeypatch.setattr(_keys, "CHUNK", 96)  # many chunks per matrix, a short last one
    model = Awkward()
    assert len(list(_keys.random_key_chunks(0, "x", 37 * 101, "cpu")())) == 39
    masks = build_masks(model, None, 0.37, method="random", seed=11, targets=model.names())
    assert_same(masks, ref_masks(model, None, 0.37, "random", seed=11, targets=model.names()))
    glob = build_masks(model, None, 0.37, method="random", seed=11, scope="global",
                       targets=model.names())
    assert_same(glob, ref_masks(model, None, 0.37, "random", seed=11, scope="global",
                                targets=model.names()))
    assert "probe_seed" not in masks.metadata and masks.metadata["seed"] == 11


_CHILD = """
import sys, torch
from torch import nn
import dowser
m = nn.Sequential(nn.Linear(70, 90, bias=False))
masks = dowser.build_masks(m, None, 0.3, method="random", seed=int(sys.argv[1]), targets=["0"])
sys.stdout.write(masks["0.weight"].numpy().tobytes().hex())
"""


def test_random_is_reproducible_from_seed_and_name_alone():
    def child(seed):
        out = subprocess.run([sys.executable, "-c", _CHILD, str(seed)], capture_output=True,
                             text=True, check=True, timeout=120)
        return out.stdout.strip()

    here = nn.Sequential(nn.Linear(70, 90, bias=False))
    nn.init.normal_(here[0].weight)  # other weights: random masks never look at them
    mine = build_masks(here, None, 0.3, method="random", seed=5, targets=["0"])["0.weight"]
    assert child(5) == mine.numpy().tobytes().hex()
    other_seed = build_masks(here, None, 0.3, method="random", seed=6, targets=["0"])["0.weight"]
    assert not torch.equal(mine, other_seed)
    # the same shape under another parameter name gets another mask
    two = nn.Sequential(nn.Linear(70, 90, bias=False), nn.Linear(70, 90, bias=False))
    m2 = build_masks(two, None, 0.3, method="random", seed=5, targets=["0", "1"])
    assert torch.equal(m2["0.weight"], mine) and not torch.equal(m2["1.weight"], mine)


def test_random_masks_look_uniform():
    lin = nn.Sequential(nn.Linear(512, 256, bias=False))
    bits = reference.unpack_mask(build_masks(lin, None, 0.25, method="random",
                                             targets=["0"])["0.weight"], 256 * 512).view(256, 512)
    # per-row and per-column counts of a uniform draw: mean 128 / 64, sd about 10 / 7
    assert float(bits.float().sum(1).std()) < 14 and float(bits.float().sum(0).std()) < 10
    assert abs(float(bits[:, :256].float().mean()) - 0.25) < 0.01


# ---- wanda: the input norms the probe gathers ----------------------------------------------

def _hooked_norms(model, targets, batches):
    """‖X_j‖₂ = sqrt(mean over every token of h_j²), from inputs hooked on a plain forward."""
    mods = dict(model.named_modules())
    seen = {n: [] for n in targets}
    handles = [mods[n].register_forward_hook(
        lambda m, args, out, n=n: seen[n].append(args[0].detach().double().reshape(
            -1, args[0].shape[-1]))) for n in targets]
    try:
        with torch.no_grad():
            for ids in batches:
                model(input_ids=ids)
    finally:
        for h in handles:
            h.remove()
    return {n: torch.cat(v).pow(2).mean(0).sqrt() for n, v in seen.items()}


def test_wanda_norms_equal_hooked_activations_real_data():
    model = tiny_llama()
    ids = torch.randint(3, 97, (6, 9), generator=torch.Generator().manual_seed(1))
    stats = probe(model, prompts=ids, layers=2, batch_size=2, n_rademacher=1, progress=False)
    hooked = _hooked_norms(model, list(stats), ids.split(2))
    for n, e in stats.items():
        torch.testing.assert_close(e.input_norms().double(), hooked[n], rtol=1e-5, atol=1e-7)


def test_wanda_norms_with_padding_and_uneven_batches():
    """Padded prompts of different lengths in batches of different sizes: a padded position
    must not count, and each batch's token mean is weighted by its number of rows (the rule of
    ProbeEntry.input_norms). The global token mean and the unmasked mean differ from it here,
    so a probe that used either fails."""
    model = tiny_llama()
    gen = torch.Generator().manual_seed(4)
    lengths = [[9, 3, 6], [2], [8, 5]]  # rows per batch 3, 1, 2; real tokens per row vary
    loader, masks = [], []
    for lens in lengths:
        width = max(lens)
        ids = torch.zeros(len(lens), width, dtype=torch.long)  # pad id 0, left padding
        mask = torch.zeros(len(lens), width, dtype=torch.long)
        for r, n in enumerate(lens):
            ids[r, width - n:] = torch.randint(3, 97, (n,), generator=gen)
            mask[r, width - n:] = 1
        loader.append({"input_ids": ids, "attention_mask": mask})
        masks.append(mask)
    stats = probe(model, dataloader=loader, layers=2, n_rademacher=1, progress=False)
    mods = dict(model.named_modules())
    seen = {n: [] for n in stats}
    handles = [mods[n].register_forward_hook(
        lambda m, args, out, n=n: seen[n].append(args[0].detach().double()))
        for n in stats]
    try:
        with torch.no_grad():
            for item in loader:
                model(**item)
    finally:
        for h in handles:
            h.remove()
    rows = torch.tensor([float(len(lens)) for lens in lengths], dtype=torch.float64)
    for n, e in stats.items():
        per_batch = torch.stack([h[m.bool()].pow(2).mean(0) for h, m in zip(seen[n], masks)])
        want = ((per_batch * rows[:, None]).sum(0) / rows.sum()).sqrt()
        got = e.input_norms().double()
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
        every_token = torch.cat([h[m.bool()] for h, m in zip(seen[n], masks)]).pow(2).mean(0).sqrt()
        unmasked = torch.stack([h.pow(2).mean((0, 1)) for h in seen[n]])
        unmasked = ((unmasked * rows[:, None]).sum(0) / rows.sum()).sqrt()
        for wrong in (every_token, unmasked):  # the test tells these rules apart
            assert not torch.allclose(got, wrong, rtol=1e-3, atol=1e-6)


def test_wanda_norms_equal_hooked_activations_data_free():
    from dowser.probe.batches import select_batches

    model = tiny_llama()
    stats = probe(model, layers=1, n_samples=4, batch_size=2, n_rademacher=1, seq_len=8,
                  progress=False)
    batches = list(select_batches(model, None, [0, 1], 4, 2, 8, 0))
    assert all(b.token_mask is None for b in batches)  # every token is real: a plain mean
    hooked = _hooked_norms(model, list(stats), [b.inputs["input_ids"] for b in batches])
    for n, e in stats.items():
        torch.testing.assert_close(e.input_norms().double(), hooked[n], rtol=1e-5, atol=1e-7)
    masks = build_masks(model, stats, 0.1, method="wanda")
    assert_same(masks, ref_masks(model, stats, 0.1, "wanda"))


# ---- metadata, files, bad input ------------------------------------------------------------

def test_metadata_survives_the_file(tmp_path):
    model = tiny_llama()
    stats = probe(model, layers=1, seed=4, **FAST)
    masks = build_masks(model, stats, 0.1, method="wanda", select="highest", seed=9)
    masks.save(tmp_path / "m.safetensors")
    back = MaskSet.load(tmp_path / "m.safetensors", model)
    assert (back.metadata["method"], back.metadata["select"], back.metadata["seed"],
            back.metadata["probe_seed"]) == ("wanda", "highest", 9, 4)
    assert "method=wanda" in back.summary() and "select=highest" in back.summary()
    assert all(torch.equal(back[n], masks[n]) for n in masks)


def test_bad_input_is_refused_before_work():
    model = Awkward()
    stats = awkward_stats(model)
    with pytest.raises(ValueError, match="method must be one of"):
        build_masks(model, stats, 0.1, method="snip")
    with pytest.raises(ValueError, match="select must be"):
        build_masks(model, stats, 0.1, select="top")
    with pytest.raises(ValueError, match="seed must be an int"):
        build_masks(model, stats, 0.1, method="random", seed=1.5)
    with pytest.raises(ValueError, match="needs probe statistics"):
        build_masks(model, None, 0.1, method="wanda", targets=model.names())
    with pytest.raises(ValueError, match="needs targets"):
        build_masks(model, None, 0.1, method="magnitude")
    with pytest.raises(ValueError, match="lacks"):
        build_masks(model, None, 0.1, method="random", targets=["layers.9"])
    with pytest.raises(ValueError, match="the statistics lack"):
        build_masks(model, stats, 0.1, method="dowser", targets=["layers.0", "nope"])
    with pytest.raises(ValueError, match="rho must be"):
        build_masks(model, None, 1.5, method="random", targets=model.names())
    old = ProbeStats({n: ProbeEntry(e.out_factors, e.in_factors, e.batch_weights)
                      for n, e in stats.items()})
    with pytest.raises(ValueError, match="no input norms"):
        build_masks(model, old, 0.1, method="wanda")
    build_masks(model, old, 0.1, method="dowser")  # the other rules do not need them
