"""The forgetting study's bookkeeping (bench/forgetting.py): grid order and size, validation-only
learning-rate choice, resumable CSV, report from partial rows; and its LoRA baseline."""

import argparse
import csv
import importlib.util
import sys
from pathlib import Path

import pytest
import torch

import dowser

BENCH = Path(__file__).resolve().parent.parent / "bench"


def _bench_module(script: str, name: str):
    """bench/<script> imported as module `name` (skipped where the tests run outside the clone)."""
    from tests.conftest import source_path

    path = source_path("bench", script)
    sys.path.insert(0, str(BENCH))
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def study():
    return _bench_module("forgetting.py", "forgetting_study")


def _row(study, config, layers, lr, seed, val_h, **kw):
    method, rho, probe, _ = study.CONFIGS[config]
    base = {"config": config, "method": method, "rho": "" if rho is None else rho, "probe": probe,
            "layers": layers, "lr": f"{lr:.0e}", "seed": seed, "trainable": 10, "A_up": 0.3,
            "CE_up": 3.0, "dA_up": -0.01, "dCE_up": 0.1, "A_down": 0.5, "A_down_exact": 0.2,
            "Avg": 0.4, "H": 0.375, "A_down_curve": "0.1000 0.5000", "val_A_up": 0.3,
            "val_A_down": 0.5, "val_H": val_h, "step_s": 1.0}
    base.update(kw)
    return {k: str(v) for k, v in base.items()}


def test_grid_order_size_and_resume(study):
    configs = list(study.CONFIGS)
    todo, total = study.grid([], [30, 8], [0, 1], 2, configs)
    assert total == 2 * sum(len(study.CONFIGS[c][3]) * 2 + 1 for c in configs) == len(todo)
    assert len(set(todo)) == len(todo) and {t[2] for t in todo if t[0] == "Dowser-LoRA 0.5"} - {None} == \
        set(study.CONFIGS["Dowser-LoRA 0.5"][3])  # every lr of a sweep longer than 3, once per seed
    # headline depth first; the middle lr of every method before the others; seed 0 before 1
    assert all(t[1] == 30 for t in todo[: total // 2]) and all(t[1] == 8 for t in todo[total // 2:])
    first = todo[: len(configs)]
    assert [t[0] for t in first] == configs and all(t[2] == study.CONFIGS[t[0]][3][1] for t in first)
    assert all(t[3] == 0 for t in todo[: 3 * len(configs)])
    third = [t for t in todo if t[2] is None]
    assert len(third) == 2 * len(configs) and all(t[3] == 2 for t in third)
    for c, (_, _, _, lrs) in study.CONFIGS.items():
        assert len(lrs) >= 3 and max(lrs) / min(lrs) >= 10 - 1e-9, c
    done = [_row(study, "LoRA", 30, study.CONFIGS["LoRA"][3][1], 0, 0.2)]
    left, _ = study.grid(done, [30, 8], [0, 1], 2, configs)
    assert len(left) == total - 1 and ("LoRA", 30, study.CONFIGS["LoRA"][3][1], 0) not in left


def test_shards_split_the_runs_left_without_overlap(study):
    todo, _ = study.grid([], [30, 8], [0, 1], 2, list(study.CONFIGS))
    k0, n = study.parse_shard("0/2")
    k1, _ = study.parse_shard("1/2")
    a, b = todo[k0::n], todo[k1::n]
    assert not set(a) & set(b) and sorted(a + b, key=todo.index) == todo and abs(len(a) - len(b)) <= 1
    for bad in ("2/2", "1", "a/b", "-1/2"):
        with pytest.raises(SystemExit, match="--shard"):
            study.parse_shard(bad)


def test_best_lr_needs_every_seed_and_uses_validation_only(study):
    lrs = study.CONFIGS["full FT"][3]
    rows = [_row(study, "full FT", 30, lr, s, val_h=v, H=1.0 - v)
            for lr, v in zip(lrs, (0.2, 0.4, 0.3)) for s in (0, 1)]
    assert study.best_lr(rows, "full FT", 30, [0, 1]) == lrs[1]  # test H (1 - v) is ignored
    assert study.best_lr(rows[:-1], "full FT", 30, [0, 1]) is None  # a sweep run is missing
    assert study.best_lr(rows, "full FT", 8, [0, 1]) is None


def test_report_from_partial_csv(study, tmp_path, monkeypatch):
    monkeypatch.setattr(study, "RESULTS", tmp_path)
    path = tmp_path / "runs.csv"
    rows = [_row(study, c, 30, lr, s, val_h=0.1 + 0.1 * i, H=0.3 + 0.01 * s + (0.1 if c == "dowser df 0.5" else 0))
            for c in ("dowser df 0.5", "random 0.5", "LoRA")
            for i, lr in enumerate(study.CONFIGS[c][3]) for s in (0, 1, 2)]
    rows.append(_row(study, "wanda 0.5", 8, study.CONFIGS["wanda 0.5"][3][0], 0, val_h=0.2))
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=study.FIELDS, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    args = argparse.Namespace(depths=[30, 8], seeds=[0, 1], third_seed=2, device="cpu", tag="", steps=32,
                              model="smollm2", every=8)
    monkeypatch.setattr(study, "plot", lambda *a: None)
    docs = tmp_path / "study.md"
    docs.write_text(f"intro\n{study.BEGIN}\nold\n{study.END}\noutro\n")
    monkeypatch.setattr(study, "DOCS", docs)
    study.report(path, args)
    md = (tmp_path / "forgetting-cpu.md").read_text()
    page = docs.read_text()
    assert page.startswith("intro\n") and page.endswith("outro\n") and "old" not in page
    assert "| 30 | dowser df 0.5 | 1e-03 | 3 |" in page
    # 3 configs x 3 lrs x 2 sweep seeds + 1 wanda run; a 3rd seed at the best lr of each of 3
    assert "19 of 108 sweep runs" in md and "3 of 18 3rd-seed runs" in md
    assert "| 30 | dowser df 0.5 | 1e-03 | 3 |" in md  # the highest val_H lr, all 3 seeds
    assert "sweep incomplete" in md  # wanda at depth 8
    pytest.importorskip("scipy")
    assert "| dowser df 0.5 | random 0.5 | H |" in md and "| dowser df 0.5 | LoRA | H |" in md


def test_lora_baseline_counts_and_leaves_base_weights(study):
    pytest.importorskip("peft")
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    model = LlamaForCausalLM(cfg)
    modules, params = study.tuned_targets(model, 2)
    assert len(modules) == 2 * 7 and all(".layers.0." not in m for m in modules)
    before = {m + ".weight": model.get_parameter(m + ".weight").detach().clone() for m in modules}
    for p in model.parameters():
        p.requires_grad_(False)
    r = 4
    peft_model = get_peft_model(model, LoraConfig(r=r, lora_alpha=2 * r, target_modules=modules))
    dims = sum(m.in_features + m.out_features for n, m in model.named_modules() if n in set(modules))
    assert study.trainable_count(peft_model, None) == r * dims
    opt = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
    ids = torch.randint(0, 64, (2, 8))
    for _ in range(2):
        peft_model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    assert study.frozen_changed(peft_model, before, None) == 0
    # LoRA never writes the base, so the 0 above only counts if a write is seen: nudge one entry
    name = modules[0] + ".weight"
    base = peft_model.get_parameter("base_model.model." + modules[0] + ".base_layer.weight")
    with torch.no_grad():
        base[1, 2] += 1.0
    assert study.frozen_changed(peft_model, before, None) == 1
    # masked: one frozen and one trainable entry moved -> only the frozen one counts
    train = torch.zeros(base.shape, dtype=torch.bool)
    train[0, 0] = True
    masks = {n: dowser.ops.pack_mask(train if n == name else torch.zeros_like(p, dtype=torch.bool))
             for n, p in before.items()}
    with torch.no_grad():
        base[0, 0] += 1.0  # trainable: allowed
    assert study.frozen_changed(peft_model, before, masks) == 1
    with torch.no_grad():
        base[1, 2] = before[name][1, 2]
    assert study.frozen_changed(peft_model, before, masks) == 0


# --- the widened study (issue 28): presets, LoRA row, t-test pairs, facts task, Dowser-LoRA runs ---

def test_grid_presets_name_real_configs_and_fair_lora_ranges(study):
    tags = [g["tag"] for g in study.GRIDS.values()]
    assert len(set(tags)) == len(tags)  # one runs CSV per grid
    for name, g in study.GRIDS.items():
        assert g["model"] in study.MODEL_NAMES and g["task"] in study.TASK_NAMES, name
        assert all(c in study.CONFIGS for c in g["configs"]), name
        todo, total = study.grid([], g["depths"], [0, 1], 2, g["configs"])
        assert total == len(todo) == len(g["depths"]) * sum(len(study.CONFIGS[c][3]) * 2 + 1 for c in g["configs"])
    assert study.GRIDS["cipher"]["configs"] == study.BASE_CONFIGS  # the default grid is unchanged
    lora = [c for c in study.CONFIGS if study.CONFIGS[c][0] in ("lora", "dowser-lora") and c != "LoRA"]
    assert {study.LORA_RANKS[c] for c in lora} >= {8, 32}
    for c in lora:
        lrs = study.CONFIGS[c][3]
        assert max(lrs) >= 3e-3 - 1e-12 and max(lrs) / min(lrs) >= 10 - 1e-9, c
    methods = {(study.CONFIGS[c][0], study.CONFIGS[c][1]) for c in study.GRIDS["gemma3"]["configs"]}
    for rho in (0.1, 0.5):
        assert {("random", rho), ("magnitude", rho), ("wanda", rho), ("dowser", rho)} <= methods
    assert ("full", None) in methods and ("lora", None) in methods


def test_ttest_pairs_and_the_lora_row(study):
    pairs = study.ttest_pairs(study.GRIDS["gemma3"]["configs"] + ["Dowser-LoRA 0.5"])
    assert ("dowser df 0.1", "random 0.1") in pairs and ("dowser df 0.1", "random 0.5") not in pairs
    for other in ("magnitude 0.5", "wanda 0.5", "LoRA r8", "LoRA r32", "full FT"):
        assert ("dowser df 0.5", other) in pairs
    assert ("Dowser-LoRA 0.5", "LoRA r8") in pairs and ("random 0.5", "full FT") not in pairs
    best = {("LoRA r8", 30): [_row(study, "LoRA r8", 30, 1e-3, s, val_h=0.3) for s in (0, 1)],
            ("LoRA r32", 30): [_row(study, "LoRA r32", 30, 1e-3, s, val_h=0.4) for s in (0, 1)],
            ("full FT", 30): [_row(study, "full FT", 30, 1e-4, s, val_h=0.9) for s in (0, 1)]}
    assert study.best_lora(best, [30, 8]) == {30: "LoRA r32"}


def test_facts_task_sets_hold_out_their_questions(study):
    from dowser.tasks import CharTokenizer

    tok = CharTokenizer()
    test, val, train_of = study.task_sets("facts", tok, 1, 12, 12)
    train = train_of(0)
    assert len(test) == len(val) == 12 and train_of(1) == train
    seen = {tuple(e.prompt) for e in train}
    assert not seen & {tuple(e.prompt) for e in test + val}
    c_test, c_val, c_train = study.task_sets("cipher", tok, 1, 5, 4)
    assert not {tuple(e.prompt) for e in c_train(0)} & {tuple(e.prompt) for e in c_test + c_val}


@pytest.mark.parametrize("config", ["Dowser-LoRA 0.5", "LoRA r8", "magnitude 0.1"])
def test_new_curves_run_end_to_end_on_a_tiny_llama(study, config, tmp_path):
    """Study.run on a random tiny Llama with the facts task: trains, counts, leaves frozen
    entries (Dowser-LoRA: masked adapter entries and base weights) untouched."""
    pytest.importorskip("peft")
    from transformers import LlamaConfig, LlamaForCausalLM

    from dowser.demo import DemoModel
    from dowser.tasks import CharTokenizer, upstream_chunks

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=259, hidden_size=32, intermediate_size=48,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                         max_position_embeddings=256)).eval()
    tok = CharTokenizer()
    args = argparse.Namespace(model="tiny", task="facts", steps=2, every=1, batch=2, lora_rank=4, n_samples=2,
                              rademacher=1, probe_len=8, progress=False, cache=str(tmp_path), device="cpu")
    st = object.__new__(study.Study)
    st.args, st.base, st.pad = args, model, 0
    st.dm = DemoModel(model, tok, None, "tiny", 0, 1, 2)
    up = upstream_chunks(tok, seq_len=16, n_chunks=3, bos_id=1)
    st.up_test, st.up_val = up[:2], up[2:]
    st.down_test, st.down_val, st.train_examples = study.task_sets("facts", tok, 1, 6, 6)
    st.zero = {"acc": 0.0, "ce": 0.0}
    st.cache = tmp_path
    st.meter = dowser.ForgettingMeter(model, st.dm.probe_tokenizer, n_samples=2, max_tokens=8, seed=0)
    row = st.run(config, 2, study.CONFIGS[config][3][-1], 0)
    assert row["frozen_changed"] == 0 and len(row["A_down_curve"].split()) == 2
    assert float(row["meter_kl_se"]) >= 0 and 0 <= float(row["meter_agree"]) <= 1  # every grid's rows
    if config == "Dowser-LoRA 0.5":
        assert row["mask_method"] == "dowser-lora"
        # per LoRA layer: ~p of lora_B's rows and of lora_A's columns, r = LORA_RANKS entries each
        assert 0 < row["trainable"] < 8 * sum(m.in_features + m.out_features for n, m in model.named_modules()
                                              if n.endswith(study.TARGET_SUFFIXES))


def test_grid_preset_fills_only_what_the_command_line_left(study):
    argv = ["--grid", "gemma3", "--depths", "6", "--tag=-g6"]
    args = argparse.Namespace(grid="gemma3", model="smollm2", task="cipher", depths=[6], configs=study.BASE_CONFIGS,
                              tag="-g6", lr_scale=1.0)
    study.apply_grid(args, argv)
    assert args.model == "gemma3" and args.depths == [6] and args.tag == "-g6"
    assert args.lr_scale == 0.1  # Gemma3 sweeps a tenth of SmolLM2's lrs...
    given = argparse.Namespace(grid="gemma3", lr_scale=0.3)
    assert study.apply_grid(given, ["--grid", "gemma3", "--lr-scale", "0.3"]).lr_scale == 0.3  # ...unless told
    assert args.configs == study.GRIDS["gemma3"]["configs"] and args.configs is not study.GRIDS["gemma3"]["configs"]
    plain = argparse.Namespace(grid=None, model="smollm2", configs=study.BASE_CONFIGS)
    assert study.apply_grid(plain, []).model == "smollm2"


def test_report_joins_the_curves_of_another_grid_of_the_same_budget(study, tmp_path, monkeypatch):
    monkeypatch.setattr(study, "RESULTS", tmp_path)
    mine = [_row(study, "LoRA r8", 30, 1e-3, s, val_h=0.3, steps=48, batch=8) for s in (0, 1)]
    base = [_row(study, c, 30, 1e-3, s, val_h=0.3, steps=48, batch=8) for c in ("dowser df 0.5", "LoRA r8")
            for s in (0, 1)]
    for name, rows in (("forgetting-runs-cpu.csv", base), ("forgetting-other-runs-cpu.csv",
                                                            [dict(r, steps="24") for r in base])):
        with open(tmp_path / name, "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=study.FIELDS, extrasaction="ignore")
            w.writeheader()
            w.writerows(rows)
    args = argparse.Namespace(join_tags=["", "-other"], device="cpu")
    joined, note = study.joined_rows(args, mine, ["LoRA r8"])
    assert {r["config"] for r in joined} == {"dowser df 0.5"} and len(joined) == 2  # its own curve not twice
    assert "joined from `forgetting-runs-cpu.csv`" in note and "not joined: `forgetting-other-runs-cpu.csv`" in note
    args = study.apply_grid(argparse.Namespace(grid="lora-fair", join_tags=[]), ["--grid", "lora-fair"])
    assert args.join_tags == [""]


@pytest.fixture(scope="module")
def meter_analysis(study):
    pytest.importorskip("scipy")
    return _bench_module("forgetting_meter.py", "forgetting_meter_analysis")


def test_meter_analysis_spearman_interval_and_gaps(meter_analysis):
    """bench/forgetting_meter.py: Spearman with tied ranks as scipy's, nan where undefined, a
    bootstrap interval around it, and the per-method rank gap computed by hand."""
    import numpy as np
    from scipy.stats import spearmanr

    m = meter_analysis
    x = np.array([0.1, 0.4, 0.4, 0.9, 2.0, 0.3])
    y = np.array([0.0, 0.2, 0.1, 0.5, 1.1, 0.3])
    assert m.spearman(x, y) == pytest.approx(spearmanr(x, y).statistic, abs=1e-12)
    assert np.isnan(m.spearman(x[:2], y[:2])) and np.isnan(m.spearman(x, np.ones(6)))
    lo, hi = m.bootstrap_ci(x, y, n_boot=200)
    assert -1 <= lo <= m.spearman(x, y) <= hi <= 1
    # three runs in one regime: the meter swaps the last two, so their gaps are -1/3 and +1/3
    runs = [{"layers": "30", "config": c, "meter_kl": k, "dCE_up": d}
            for c, k, d in (("full FT", "0.1", "0.1"), ("LoRA", "0.5", "0.9"), ("random 0.5", "0.9", "0.5"))]
    table = "\n".join(m.method_gaps(runs))
    assert "| 30 | full FT | 1 | +0.000 |" in table
    assert "| 30 | LoRA | 1 | -0.333 |" in table and "| 30 | random 0.5 | 1 | +0.333 |" in table


def test_report_counts_only_its_own_curves_as_grid_done(study, tmp_path, monkeypatch):
    """A grid that joins another grid's curves (lora-fair) reports its own progress: joined runs,
    third seeds included, are tabled but not counted as this grid's runs."""
    monkeypatch.setattr(study, "RESULTS", tmp_path)
    monkeypatch.setattr(study, "plot", lambda *a: None)
    monkeypatch.setattr(study, "DOCS", tmp_path / "absent.md")

    def sweep(config, best):
        rows = [_row(study, config, 30, lr, s, val_h=0.5 if lr == best else 0.2, steps=48, batch=8)
                for lr in study.CONFIGS[config][3] for s in (0, 1)]
        return rows + [_row(study, config, 30, best, 2, val_h=0.5, steps=48, batch=8)]

    for name, rows in (("forgetting-lora-runs-cpu.csv", sweep("LoRA r8", study.CONFIGS["LoRA r8"][3][1])),
                       ("forgetting-runs-cpu.csv", sweep("dowser df 0.5", study.CONFIGS["dowser df 0.5"][3][0]))):
        with open(tmp_path / name, "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=study.FIELDS, extrasaction="ignore")
            w.writeheader()
            w.writerows(rows)
    args = argparse.Namespace(depths=[30], seeds=[0, 1], third_seed=2, device="cpu", tag="-lora", steps=48,
                              model="smollm2", task="cipher", grid="lora-fair", configs=["LoRA r8"],
                              join_tags=[""], every=8)
    study.report(tmp_path / "forgetting-lora-runs-cpu.csv", args)
    md = (tmp_path / "forgetting-lora-cpu.md").read_text()
    assert "grid done: 7 of 7 required runs (6 of 6 sweep runs, 1 of 1 3rd-seed runs)" in md
    assert "| 30 | dowser df 0.5 | 1e-04 | 3 |" in md  # the joined curve is still tabled


def test_sign_step_moves_only_its_group_along_the_gradient():
    """bench/sign_step.py (why the Gemma3 grid sweeps smaller lrs): the gradient step lowers the
    batch's loss, a random step of the same size does not, each group moves only its weights,
    and the model it is given stays untouched."""
    from dowser.tasks import Example, collate
    from tests.models import tiny_llama

    mod = _bench_module("sign_step.py", "sign_step")

    model = tiny_llama(n_layers=2)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    gen = torch.Generator().manual_seed(0)
    up = torch.randint(3, 97, (2, 16), generator=gen)
    examples = [Example(torch.randint(3, 97, (5,), generator=gen).tolist(),
                        torch.randint(3, 97, (3,), generator=gen).tolist()) for _ in range(4)]
    rows = mod.sign_step_rows(model, up, collate(examples, 0), steps=[3e-3])
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    assert len(rows) == 1 + 2 * len(mod.GROUPS) and rows[0]["group"] == "none"
    base = rows[0]["loss_after"]
    by = {(r["group"], r["direction"]): r for r in rows[1:]}
    for group in mod.GROUPS:
        assert by[group, "gradient"]["loss_after"] < base - 1e-4, group  # first order: -step * |g|_1
    assert by["all linear", "gradient"]["loss_after"] < by["all linear", "random"]["loss_after"]
    names = mod.linear_weights(model, mod.GROUPS["down_proj"])
    assert names == [f"model.layers.{i}.mlp.down_proj.weight" for i in range(2)]
    assert len(mod.linear_weights(model, mod.GROUPS["all linear"])) == 14
