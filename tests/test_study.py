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


@pytest.fixture(scope="module")
def study():
    sys.path.insert(0, str(BENCH))
    spec = importlib.util.spec_from_file_location("forgetting_study", BENCH / "forgetting.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


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
    assert total == 2 * len(configs) * (3 * 2 + 1) == len(todo)
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
