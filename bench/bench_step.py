"""Per-step cost of fine-tuning SmolLM2-135M: full fine-tuning (torch AdamW) vs dowser
(MaskedAdamW on Model-Dowser masks), same layers, same batches, same process.

    python bench/bench_step.py                      # last 8 and all 30 layers, rho 0.1 / 0.5
    python bench/bench_step.py --layers 8 --steps 4 # quicker

One step is what `dowser.finetune.train` does: collate a batch of 8 digit-cipher examples,
forward with the answer-token loss (`dowser.finetune.answer_loss`), backward, clip the gradient
norm to 1, optimizer step (MaskedAdamW with grads_finite=True when the clipped norm is finite:
that norm already proves every gradient finite), zero_grad. Each phase is timed by wall clock and by this process's
CPU time (`time.process_time`; on a shared machine wall time also counts the time other
processes hold the cores, CPU time does not).

Timing: all configurations of one depth train the same model on the same batch sequence,
interleaved step by step (step i of every configuration, then step i + 1), so machine load hits
them alike; medians over --steps steps after --warmup steps each. Full fine-tuning has three
rows: torch.optim.AdamW as `dowser demo` and bench/forgetting.py call it (default
implementation: the for-loop one on CPU), foreach=True and fused=True; the three share one
AdamW state (same format), so only one copy of it is held. Ratios are against the default
AdamW and against fused AdamW of the same depth, from the same run.

Peak RSS: after the timing, every configuration in turn gets a fresh optimizer and takes two
steps with the peak resident set reset just before (Linux clear_refs; freed memory handed back
with malloc_trim first); the number includes the model and its gradients.

Masks: Model-Dowser masks from a small data-free probe (--probe-samples prompts; probing is not
timed), built with dowser.build_masks.

Two diagnostic rows (at the --extra-layers depths, default the last 8 only): full fine-tuning with the loss as train() computed
it before (`model(**batch).loss`: logits of every position through the 49k-vocabulary head),
and dowser at rho = 0.1 on the plain-PyTorch reference step (DOWSER_BACKEND=reference: what a
dowser install without its C++ extension runs).
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import os
import random
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_results  # noqa: E402

import dowser  # noqa: E402
from dowser.demo import last_layer_params, load_smollm2  # noqa: E402
from dowser.finetune import answer_loss, freeze_outside  # noqa: E402
from dowser.profiling import _read_status_kib, reset_peak_rss  # noqa: E402
from dowser.tasks import cipher_examples, collate  # noqa: E402

PHASES = ("batch", "forward", "backward", "clip", "optim", "zero_grad")


def _trim() -> None:
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _dowser_name(rho: float) -> str:
    return f"dowser rho={rho}, MaskedAdamW"


FULL_VOCAB = "full FT, torch AdamW (default), full-vocab loss"
REFERENCE = "dowser rho=0.1, MaskedAdamW, reference backend (no dowser._C)"


def _full_vocab_loss(model, batch):
    return model(**batch).loss  # what dowser.finetune.train computed before answer_loss


def _configs(params, masks_by_rho, model, lr, extra: bool):
    """name -> (optimizer factory, loss function, DOWSER_BACKEND to force or None)."""
    def adamw(**kw):
        return lambda: torch.optim.AdamW(params, lr=lr, weight_decay=0.0, **kw)

    def masked(masks):
        return lambda: dowser.MaskedAdamW(params, masks, model=model, lr=lr, weight_decay=0.0)

    out = {
        "full FT, torch AdamW (default)": (adamw(), answer_loss, None),
        "full FT, torch AdamW foreach": (adamw(foreach=True), answer_loss, None),
        "full FT, torch AdamW fused": (adamw(fused=True), answer_loss, None),
    }
    for rho, masks in masks_by_rho.items():
        out[_dowser_name(rho)] = (masked(masks), answer_loss, None)
    if extra:
        out[FULL_VOCAB] = (adamw(), _full_vocab_loss, None)
        if 0.1 in masks_by_rho:
            out[REFERENCE] = (masked(masks_by_rho[0.1]), answer_loss, "reference")
    return out


def _step(model, params, opt, examples, pad_id, rng_seed, loss_fn=answer_loss, backend=None):
    """One train() step, timed per phase: {phase: (wall s, cpu s)}."""
    out = {}

    def mark(name, t0, c0):
        out[name] = (time.perf_counter() - t0, time.process_time() - c0)
        return time.perf_counter(), time.process_time()

    t, c = time.perf_counter(), time.process_time()
    batch = collate(random.Random(rng_seed).sample(examples, 8), pad_id)
    t, c = mark("batch", t, c)
    loss = loss_fn(model, batch)
    t, c = mark("forward", t, c)
    loss.backward()
    t, c = mark("backward", t, c)
    finite = bool(torch.isfinite(torch.nn.utils.clip_grad_norm_(params, 1.0)))
    t, c = mark("clip", t, c)
    if backend:
        os.environ["DOWSER_BACKEND"] = backend  # read by the op dispatcher at each call
    try:
        if finite and isinstance(opt, dowser.MaskedAdamW):  # as dowser.finetune.train does
            opt.step(grads_finite=True)
        else:
            opt.step()
    finally:
        if backend:
            del os.environ["DOWSER_BACKEND"]
    t, c = mark("optim", t, c)
    opt.zero_grad(set_to_none=True)
    mark("zero_grad", t, c)
    return out


def run_depth(dm, layers: int, rhos: list[float], steps: int, warmup: int, probe_samples: int,
              lr: float, extra: bool) -> list[dict]:
    model = dm.model
    t0 = time.perf_counter()
    stats = dowser.probe(model, dm.probe_tokenizer, layers=layers, n_samples=probe_samples,
                         batch_size=4, seq_len=32, n_rademacher=2, progress=False)
    masks_by_rho = {rho: dowser.build_masks(model, stats, rho) for rho in rhos}
    print(f"[{layers} layers] probe + masks {time.perf_counter() - t0:.1f} s", flush=True)
    del stats
    freeze_outside(model, last_layer_params(model, layers))
    params = [p for p in model.parameters() if p.requires_grad]
    n_params = sum(p.numel() for p in params)
    n_masked = sum(model.get_parameter(n).numel() for n in masks_by_rho[rhos[0]])
    examples = cipher_examples(dm.tokenizer, 512, seed=1000, bos_id=dm.bos_id)
    configs = _configs(params, masks_by_rho, model, lr, extra)
    opts = {name: make() for name, (make, _, _) in configs.items()}
    shared = opts["full FT, torch AdamW (default)"].state
    for name, opt in opts.items():
        if isinstance(opt, torch.optim.AdamW):
            opt.state = shared  # one AdamW state for the three implementations
    model.train()
    times: dict[str, list[dict]] = {name: [] for name in opts}
    for i in range(warmup + steps):
        for name, opt in opts.items():
            _, loss_fn, backend = configs[name]
            ph = _step(model, params, opt, examples, dm.pad_id, i, loss_fn, backend)
            if i >= warmup:
                times[name].append(ph)
        print(f"[{layers} layers] step {i + 1}/{warmup + steps}", flush=True)
    del opts, shared
    model.zero_grad(set_to_none=True)
    _trim()
    # peak RSS of two steps from a fresh optimizer, one configuration at a time
    peaks = {}
    for name, (make, loss_fn, backend) in configs.items():
        _trim()
        base = _read_status_kib("VmRSS")
        reset_peak_rss()
        opt = make()
        for i in range(2):
            _step(model, params, opt, examples, dm.pad_id, i, loss_fn, backend)
        peaks[name] = (_read_status_kib("VmHWM") / 1024, base / 1024)
        del opt
        model.zero_grad(set_to_none=True)
    model.eval()
    rows = []
    med = {name: {ph: (statistics.median(s[ph][0] for s in t), statistics.median(s[ph][1] for s in t))
                  for ph in PHASES} for name, t in times.items()}
    total = {name: (statistics.median(sum(s[ph][0] for ph in PHASES) for s in t),
                    statistics.median(sum(s[ph][1] for ph in PHASES) for s in t))
             for name, t in times.items()}
    ref_default = total["full FT, torch AdamW (default)"]
    ref_fused = total["full FT, torch AdamW fused"]
    trainable = {name: n_params for name in times}
    for rho, masks in masks_by_rho.items():
        trainable[_dowser_name(rho)] = sum(t for t, _ in masks.counts().values()) + n_params - n_masked
    if REFERENCE in times:
        trainable[REFERENCE] = trainable[_dowser_name(0.1)]
    for name in times:
        row = {"layers": layers, "config": name, "trainable": trainable[name],
               "step_cpu_s": total[name][1], "step_wall_s": total[name][0],
               "cpu_vs_default": total[name][1] / ref_default[1],
               "cpu_vs_fused": total[name][1] / ref_fused[1],
               "wall_vs_default": total[name][0] / ref_default[0]}
        for ph in PHASES:
            row[f"{ph}_cpu_s"] = med[name][ph][1]
        row["optim_wall_s"] = med[name]["optim"][0]
        row["peak_rss_mb"] = peaks[name][0]
        row["rss_before_mb"] = peaks[name][1]
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, nargs="+", default=[8, 30])
    ap.add_argument("--rhos", type=float, nargs="+", default=[0.1, 0.5])
    ap.add_argument("--steps", type=int, default=8, help="timed steps per configuration")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads (default: torch's choice, as `dowser demo` runs)")
    ap.add_argument("--probe-samples", type=int, default=8)
    ap.add_argument("--lr", type=float, default=1e-5)
    ap.add_argument("--name", default="step")
    ap.add_argument("--extra-layers", type=int, nargs="*", default=[8],
                    help="depths that also get the two diagnostic rows (full-vocab loss; "
                         "reference backend); none with an empty list")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    load0 = os.getloadavg()[0]
    dm = load_smollm2()
    rows: list[dict] = []
    for layers in args.layers:
        rows += run_depth(dm, layers, args.rhos, args.steps, args.warmup, args.probe_samples,
                          args.lr, layers in args.extra_layers)
        _write(args, rows, load0)  # after every depth: a killed run keeps what it measured
    return 0


def _write(args, rows: list[dict], load0: float) -> None:
    info = dowser.backend_info()
    notes = (
        "SmolLM2-135M-Instruct (fp32), batch 8 digit-cipher examples, answer-token loss "
        f"(dowser.finetune.answer_loss), grad clip 1.0; medians of {args.steps} steps after "
        f"{args.warmup} warm-up steps per configuration, all configurations of a depth "
        "interleaved step by step in one process. cpu = this process's CPU time "
        "(time.process_time), wall = wall clock; *_vs_default / *_vs_fused: ratio to full FT "
        "with torch AdamW default / fused, same depth, same run. Phases: batch (collate), "
        "forward, backward, clip (clip_grad_norm_), optim (optimizer.step), zero_grad. "
        "peak_rss_mb: peak resident set of two steps from a fresh optimizer (model and "
        "gradients included); rss_before_mb: resident set just before. trainable: entries "
        "the optimizer updates (masked matrices' mask counts + dense 1-D parameters). "
        f"Diagnostic rows: '{FULL_VOCAB}' = the loss of every position through the "
        "vocabulary head, as train() computed it before; "
        f"'{REFERENCE}' = the plain-PyTorch fallback step.\n\n"
        f"- masked_adamw_step backend: {info['masked_adamw_step']['cpu']['backend']} "
        f"({info['masked_adamw_step']['cpu']['why']}); dowser._C: {info['_C']['how']}\n"
        f"- torch threads: {torch.get_num_threads()}; load average (1 min) at start / end: "
        f"{load0:.1f} / {os.getloadavg()[0]:.1f} (a shared machine: wall times move with it)\n"
        f"- masks: Model-Dowser, data-free probe N={args.probe_samples}, R=2, 32 tokens")
    write_results(args.name, rows, "cpu", notes)


if __name__ == "__main__":
    raise SystemExit(main())
