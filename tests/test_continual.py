"""Continual learning: MaskSet set operations and selection that keeps earlier tasks' entries
frozen (dowser.build_masks_excluding / dowser.prepare(protect=)), against plain references."""

import copy

import pytest
import torch

import dowser
from dowser.masks import MaskSet
from dowser.ops import pack_mask, popcount, unpack_mask
from dowser.probe import ProbeEntry, ProbeStats
from tests.models import tiny_llama

PROBE = dict(n_samples=4, batch_size=2, n_rademacher=2, seq_len=16, progress=False)


def _random_set(shapes, p, seed):
    gen = torch.Generator().manual_seed(seed)
    masks = {n: pack_mask(torch.rand(s, generator=gen) < p) for n, s in shapes.items()}
    return MaskSet(masks, shapes, {"rho": p, "model_name": "x"})


def _bools(ms):
    return {n: unpack_mask(ms[n], ms.shapes[n]) for n in ms}


# --- set operations ------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(1, 1), (3, 7), (5, 64), (33, 31)])
def test_set_operations_match_bool_reference(shape):
    a = _random_set({"w": shape, "only_a": (2, 3)}, 0.4, 0)
    b = _random_set({"w": shape, "only_b": (9,)}, 0.6, 1)
    A, B = _bools(a), _bools(b)
    union, inter, diff = a | b, a & b, a - b
    assert list(union) == ["w", "only_a", "only_b"] and list(inter) == ["w"]
    assert list(diff) == ["w", "only_a"]
    assert torch.equal(unpack_mask(union["w"], shape), A["w"] | B["w"])
    assert torch.equal(unpack_mask(inter["w"], shape), A["w"] & B["w"])
    assert torch.equal(unpack_mask(diff["w"], shape), A["w"] & ~B["w"])
    assert torch.equal(union["only_b"], b["only_b"]) and torch.equal(diff["only_a"], a["only_a"])
    n = shape[0] * shape[1]
    for ms in (union, inter, diff):  # padding bits stay 0: popcount equals the bool count
        for name in ms:
            assert popcount(ms[name]) == int(unpack_mask(ms[name], ms.shapes[name]).sum())
    assert popcount(diff["w"]) + popcount(inter["w"]) == popcount(a["w"]) <= n
    assert "rho" not in union.metadata and union.metadata["model_name"] == "x"
    # the operands are not changed
    assert torch.equal(_bools(a)["w"], A["w"])


def test_set_operations_refuse_other_shapes_and_types():
    a = _random_set({"w": (4, 8)}, 0.5, 0)
    b = _random_set({"w": (8, 4)}, 0.5, 1)
    with pytest.raises(ValueError, match="'w' is"):
        a | b
    with pytest.raises(TypeError):
        a | {"w": b["w"]}


# --- selection among unprotected entries -----------------------------------------------------

@pytest.fixture(scope="module")
def probed():
    model = tiny_llama(n_layers=2)
    stats = dowser.probe(model, None, layers=1, **PROBE)
    return model, stats


def _scores_by_param(model, stats):
    named = dict(model.named_modules())
    out = {}
    for mname, e in stats.items():
        w = named[mname].weight
        out[mname + ".weight"] = dowser.ops.scores(w, e.out_factors, e.in_factors,
                                                   batch_weights=e.batch_weights).double()
    return out


def _reference(scores, protect, rho, scope):
    """k lowest scores with protected entries at +inf; ties to the lower (layer, flat) index."""
    def bottom(flat, k):
        order = torch.sort(flat, stable=True).indices[:k]
        sel = torch.zeros(flat.numel(), dtype=torch.bool)
        sel[order] = True
        return sel

    flats = {}
    for name, s in scores.items():
        f = s.reshape(-1).clone()
        if name in protect:
            f[unpack_mask(protect[name], s.shape).reshape(-1)] = float("inf")
        flats[name] = f
    if scope == "global":
        allf = torch.cat(list(flats.values()))
        sel = bottom(allf, int(rho * allf.numel() + 0.5))
        out, i = {}, 0
        for name, f in flats.items():
            out[name] = sel[i:i + f.numel()].view(scores[name].shape)
            i += f.numel()
        return out
    return {n: bottom(f, int(rho * f.numel() + 0.5)).view(scores[n].shape) for n, f in flats.items()}


@pytest.mark.parametrize("scope", ["matrix", "global"])
@pytest.mark.parametrize("kind", ["earlier_task", "random_half", "none"])
def test_excluding_equals_plain_reference(probed, scope, kind):
    model, stats = probed
    rho = 0.2
    shapes = {n + ".weight": tuple(dict(model.named_modules())[n].weight.shape) for n in stats}
    if kind == "earlier_task":
        protect = dowser.build_masks(model, stats, rho=0.25, scope=scope)
    elif kind == "random_half":
        protect = _random_set(shapes, 0.5, 3)
    else:
        protect = MaskSet({}, {})
    masks = dowser.build_masks_excluding(model, stats, protect, rho=rho, scope=scope)
    ref = _reference(_scores_by_param(model, stats), protect, rho, scope)
    total = 0
    for name, want in ref.items():
        got = unpack_mask(masks[name], want.shape)
        assert torch.equal(got, want), f"{name}: selection differs from the reference"
        if name in protect:
            assert not (got & unpack_mask(protect[name], want.shape)).any()
        if scope == "matrix":
            assert int(got.sum()) == int(rho * want.numel() + 0.5)
        total += int(got.sum())
    if scope == "global":
        n = sum(w.numel() for w in ref.values())
        assert total == int(rho * n + 0.5)


def test_excluding_ties_go_to_the_lowest_free_index():
    """Constant scores: every entry ties, so the new mask is the first k free flat indices."""
    model = tiny_llama(n_layers=1)
    name = "model.layers.0.self_attn.q_proj"
    w = dict(model.named_modules())[name].weight
    with torch.no_grad():
        w.fill_(0.5)
        w[0, :3] = 0.0  # zero scores rank first
    d_out, d_in = w.shape
    stats = ProbeStats({name: ProbeEntry(torch.ones(1, d_out), torch.ones(1, d_in), torch.ones(1))})
    n = w.numel()
    gen = torch.Generator().manual_seed(0)
    prot_bool = torch.rand(n, generator=gen) < 0.5
    prot_bool[1] = True  # one zero-score entry protected
    protect = MaskSet({name + ".weight": pack_mask(prot_bool.view(w.shape))},
                      {name + ".weight": tuple(w.shape)})
    for rho in (0.0, 0.1, 0.3, 0.5):
        k = int(rho * n + 0.5)
        if k > n - int(prot_bool.sum()):
            continue
        masks = dowser.build_masks_excluding(model, stats, protect, rho=rho)
        got = unpack_mask(masks[name + ".weight"], (n,))
        free = (~prot_bool).nonzero().flatten()
        zeros_free = [i for i in (0, 2) if not prot_bool[i]]
        order = zeros_free + [int(i) for i in free if int(i) not in (0, 1, 2)]
        want = torch.zeros(n, dtype=torch.bool)
        want[order[:k]] = True
        assert torch.equal(got, want), rho


def test_too_few_free_entries_is_an_error(probed):
    model, stats = probed
    shapes = {n + ".weight": tuple(dict(model.named_modules())[n].weight.shape) for n in stats}
    nearly_all = _random_set(shapes, 0.95, 5)
    with pytest.raises(ValueError, match="protect leaves .* free, fewer than the k"):
        dowser.build_masks_excluding(model, stats, nearly_all, rho=0.1)
    with pytest.raises(ValueError, match="scope='global'"):
        dowser.build_masks_excluding(model, stats, nearly_all, rho=0.1, scope="global")
    # rho=0 always fits; exactly as many free as needed fits too
    zero = dowser.build_masks_excluding(model, stats, nearly_all, rho=0.0)
    assert all(popcount(v) == 0 for v in zero.values())
    name = next(iter(shapes))
    n = shapes[name][0] * shapes[name][1]
    k = int(0.5 * n + 0.5)
    exact = torch.zeros(n, dtype=torch.bool)
    exact[: n - k] = True
    got = dowser.build_masks_excluding(model, stats, MaskSet({name: pack_mask(exact.view(shapes[name]))},
                                                             {name: shapes[name]}), rho=0.5)
    assert torch.equal(unpack_mask(got[name], (n,)), ~exact)


def test_prepare_protect_freezes_earlier_entries(tmp_path):
    model = tiny_llama(n_layers=3)
    first = dowser.prepare(model, None, rho=0.2, layers=2, **PROBE)
    assert any(p.requires_grad for n, p in model.named_parameters() if n.endswith("norm.weight"))
    second = dowser.prepare(model, None, rho=0.2, layers=2, protect=[first], seed=1, **PROBE)
    for name in second:
        shape = second.shapes[name]
        a, b = unpack_mask(first[name], shape), unpack_mask(second[name], shape)
        assert not (a & b).any(), name
        assert int(b.sum()) == int(0.2 * a.numel() + 0.5)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == set(second)  # 1-D parameters frozen under protect
    both = first | second
    with pytest.raises(ValueError, match="fewer than the k"):
        dowser.prepare(model, None, rho=0.7, layers=2, protect=both, **PROBE)  # before probing

    # content hashes recorded by prepare: a same-shaped different model is refused on load
    path = tmp_path / "m.safetensors"
    second.save(path)
    assert dowser.MaskSet.load(path, model, check_content=True).keys() == second.keys()
    other = tiny_llama(n_layers=3, seed=1)
    dowser.MaskSet.load(path, other)  # names and shapes alone cannot tell
    with pytest.raises(ValueError, match="frozen entries of .* differ"):
        dowser.MaskSet.load(path, other, check_content=True)
    # training the masked entries does not change the hash
    trained = copy.deepcopy(model)
    with torch.no_grad():
        for name in second:
            p = trained.get_parameter(name)
            p[unpack_mask(second[name], p.shape)] += 1.0
    dowser.MaskSet.load(path, trained, check_content=True)


# --- the paper's continual-learning metrics (bench/continual.py) -----------------------------

def _continual_bench():
    import importlib.util
    import sys
    from pathlib import Path

    from tests.conftest import source_path

    bench = source_path("bench")
    sys.path.insert(0, str(bench))
    spec = importlib.util.spec_from_file_location("continual_bench", bench / "continual.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_cl_metrics_hand_computed_example():
    cl = _continual_bench()
    # A[t][i]: accuracy on task i after stage t
    acc = [[0.9, 0.1, 0.0],
           [0.6, 0.8, 0.2],
           [0.5, 0.4, 0.7]]
    m = cl.cl_metrics(acc, a_up=0.4)
    assert m["MFT"] == pytest.approx((0.9 + 0.8 + 0.7) / 3)                      # 0.8
    assert m["MFN"] == pytest.approx((0.5 + 0.4 + 0.7) / 3)                      # 0.5333
    assert m["MAA"] == pytest.approx((0.9 + (0.6 + 0.8) / 2 + (0.5 + 0.4 + 0.7) / 3) / 3)  # 0.7111
    assert m["BWT"] == pytest.approx(((0.5 - 0.9) + (0.4 - 0.8) + (0.7 - 0.7)) / 3)  # -0.2667
    assert m["H"] == pytest.approx(2 * 0.4 * 0.5333333 / (0.4 + 0.5333333))       # 0.4571
    assert m["BWT"] == pytest.approx(m["MFN"] - m["MFT"])
    # the paper's Table 9 (LLaVA, 5 tasks): H from A_up and MFN, BWT = MFN - MFT, to its rounding
    for a_up, mft, mfn, bwt, h in ((40.2, 70.2, 54.7, -15.6, 46.3), (61.2, 69.1, 66.6, -2.5, 63.8),
                                   (61.2, 67.9, 60.0, -7.8, 60.6), (40.6, 69.1, 55.9, -13.2, 47.0)):
        assert 2 * a_up * mfn / (a_up + mfn) == pytest.approx(h, abs=0.06)
        assert mfn - mft == pytest.approx(bwt, abs=0.11)
    with pytest.raises(ValueError, match="T x T"):
        cl.cl_metrics([[1.0, 0.0]], 0.5)


def test_continual_resume_keeps_only_complete_runs():
    cl = _continual_bench()
    rows = [{"method": "zero-shot", "seed": "", "stage": "0"}]
    rows += [{"method": "dowser", "seed": "0", "stage": str(s), "v": "old"} for s in (1, 2)]  # cut short
    rows += [{"method": "dowser", "seed": "0", "stage": str(s), "v": "new"} for s in (1, 2, 3)]
    rows += [{"method": "LoRA", "seed": "0", "stage": str(s)} for s in (1, 2)]
    done = cl.complete_runs(rows, 3)
    assert list(done) == [("dowser", "0")] and [r["v"] for r in done["dowser", "0"]] == ["new"] * 3


def test_continual_report_from_rows(tmp_path, monkeypatch):
    import argparse

    cl = _continual_bench()
    monkeypatch.setattr(cl, "RESULTS", tmp_path)
    tasks = ["alpha", "beta", "gamma"]
    fields = ["method", "seed", "stage", "trained", "steps", "batch", "layers", "A_up", "CE_up", "train_s"] + tasks
    path = tmp_path / "runs.csv"
    cl.append_row(path, {"method": "zero-shot", "stage": 0, "A_up": 0.4, "CE_up": 3.0, "alpha": 0.0,
                         "beta": 0.0, "gamma": 0.0}, fields)
    acc = [[0.9, 0.1, 0.0], [0.6, 0.8, 0.2], [0.5, 0.4, 0.7]]
    for seed in (0, 1):
        for t, row in enumerate(acc, 1):
            cl.append_row(path, {"method": "dowser", "seed": seed, "stage": t, "trained": tasks[t - 1], "steps": 2,
                                 "batch": 4, "layers": 2, "A_up": 0.4, "CE_up": 3.5, "train_s": 1.0,
                                 **dict(zip(tasks, row))}, fields)
    cl.append_row(path, {"method": "LoRA", "seed": 0, "stage": 1, "steps": 2, "batch": 4, "layers": 2,
                         "A_up": 0.4, "CE_up": 3.0, "alpha": 0.5, "beta": 0.0, "gamma": 0.0, "train_s": 1}, fields)
    args = argparse.Namespace(tasks=tasks, methods=["dowser", "lora"], seeds=[0, 1], device="cpu", tag="-t")
    md = cl.report(path, args).read_text()
    assert "grid done: 2 of 4" in md
    assert "| dowser | 2 | 0.800 ± 0.000 | 0.533 ± 0.000 | 0.711 ± 0.000 | -0.267 ± 0.000 | 0.400 ± 0.000 | 0.500 ± 0.000 | 0.457 ± 0.000 |" in md
    assert "| LoRA |" not in md  # its run is incomplete


@pytest.mark.parametrize("method", ["full FT", "LoRA", "random", "dowser", "dowser + protect"])
def test_continual_methods_run_end_to_end_on_a_tiny_llama(method):
    """Continual.run on a random tiny Llama, three ciphers, one step each: a row per stage, no
    frozen entry moved, and (protect) the earlier stages' entries bit-identical."""
    import argparse

    if method == "LoRA":
        pytest.importorskip("peft")
    from transformers import LlamaConfig, LlamaForCausalLM

    from dowser.demo import DemoModel
    from dowser.tasks import CharTokenizer, upstream_chunks

    cl = _continual_bench()
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=259, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2,
                                         max_position_embeddings=256)).eval()
    tok = CharTokenizer()
    tasks = ["alpha", "beta", "gamma"]
    args = argparse.Namespace(tasks=tasks, steps=1, layers=1, rho=0.2, lr_full=1e-3, lr_lora=1e-3, lr_sparse=1e-2,
                              lora_rank=2, n_samples=2, n_rademacher=1, probe_seq_len=8, batch=2)
    c = object.__new__(cl.Continual)
    c.args, c.base = args, model
    c.dm = DemoModel(model, tok, None, "tiny", 0, 1, 1)
    c.up = upstream_chunks(tok, seq_len=16, n_chunks=1, bos_id=1)
    c.train_sets, c.test_sets = cl.task_sets(tok, tasks, 4, (2, 3), 1, 0)
    rows = []
    c.run(method, 0, rows.append)
    assert [r["stage"] for r in rows] == [1, 2, 3] and [r["trained"] for r in rows] == tasks
    assert all(0 <= r[t] <= 1 for r in rows for t in tasks)
    if method not in ("full FT", "LoRA"):
        assert all(r["frozen_changed"] == 0 for r in rows)
    if method == "dowser + protect":
        assert [r.get("protected_changed") for r in rows] == [None, 0, 0]
