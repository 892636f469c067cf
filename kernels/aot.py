"""Ahead-of-time compile check of every Triton kernel of dowser, for NVIDIA GPUs, without one.

    python -m dowser.kernels.aot [--arch 80 90] [--json out.json]

1. Runs the Python wrappers (scores, select_masks, pack/unpack) on CPU tensors over every
   specialisation they can launch: weight dtypes fp32/fp16/bf16, 2-D tile and flat layouts,
   row-major / transposed / generally strided weights, B = 1 and B > 1, every selection pass;
   `dowser.kernels._launch.record` captures the launches instead of running them.
2. Groups the launches by (kernel, weight dtype, layout, mode) and derives each launch's
   specialisation key with Triton's rules (ints not marked do_not_specialize specialise on
   value 1 and on divisibility by 16, pointers on 16-byte alignment, ints by i32/i64 range):
   a group whose launches need more than one compile fails the check.
3. Compiles each group once per architecture with the real Triton compiler and its bundled
   ptxas (`triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))`), with the
   launch's own options (FP fusion pinned), and reads registers and spills from the ptxas log.
   Any spill fails the check.
4. Counts atomics and fences in the PTX of every selection pass: none may be a fence or carry
   acquire/release semantics; global atomics are allowed only in the HIST pass, relaxed.

Must run without TRITON_INTERPRET=1 (the kernels must be real JIT functions). Compiles are
cached by Triton (TRITON_CACHE_DIR); the ptxas numbers of cached kernels are kept beside them.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import sys
import time
from dataclasses import dataclass, field

os.environ.setdefault("TRITON_DUMP_PTXAS_LOG", "1")

import torch  # noqa: E402

_TRITON_DTYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16",
                  torch.int32: "i32", torch.int64: "i64", torch.int8: "i8", torch.uint8: "u8",
                  torch.bool: "i1"}
MODE_NAMES = {0: "HIST", 1: "TIES", 2: "WRITE"}


@dataclass
class Compiled:
    kernel: str
    group: tuple
    arch: int
    n_regs: int
    n_spills: int
    shared: int
    seconds: float
    atomics: list = field(default_factory=list)  # PTX atom/red instructions (opcode text)
    fences: int = 0


def _int_type(v: int) -> str:
    return "i32" if -2**31 <= v < 2**31 else ("u64" if v >= 2**63 else "i64")


def spec_key(kernel, args: tuple, constexprs: dict) -> tuple:
    """The specialisation Triton's launcher derives from these arguments (what decides a
    compile besides the constexprs and options)."""
    key = []
    for param, value in zip(kernel.params, args):
        if isinstance(value, torch.Tensor):
            aligned = value.data_ptr() % 16 == 0 and not param.do_not_specialize_on_alignment
            key.append(("*" + _TRITON_DTYPES[value.dtype], aligned))
        elif isinstance(value, bool):
            key.append(("i1", value if not param.do_not_specialize else None))
        elif isinstance(value, int):
            if param.do_not_specialize:
                key.append((_int_type(value),))
            else:
                key.append((_int_type(value), value == 1, value % 16 == 0))
        elif isinstance(value, float):
            key.append(("fp32",))
        elif value is None:
            key.append(("none",))
        else:
            raise TypeError(f"{kernel.__name__}: cannot specialise a {type(value).__name__}")
    key.append(tuple(sorted(constexprs.items())))
    return tuple(key)


def _group_of(launch) -> tuple:
    """(kernel, weight dtype, layout, mode): what may need its own compile."""
    first = next((a for a in launch.args if isinstance(a, torch.Tensor)), None)
    dtype = _TRITON_DTYPES.get(first.dtype, str(first.dtype)) if first is not None else "-"
    c = launch.constexprs
    return (launch.kernel.__name__, dtype, c.get("LAYOUT", "-"), c.get("MODE", "-"))


def enumerate_launches() -> list:
    """Every launch the wrappers make over the specialisation space (nothing runs)."""
    from dowser.kernels import _launch, pack, score, select

    gen = torch.Generator().manual_seed(0)
    launches = []
    with _launch.record() as rec:
        for dtype in (torch.float32, torch.float16, torch.bfloat16):
            for d_out, d_in in ((33, 96), (40, 160), (33, 97), (1, 50)):  # tile and flat
                base = torch.randn(d_out, 2 * d_in, generator=gen).to(dtype)
                weights = {"row": base[:, :d_in],  # row-major, stride(0) != d_in
                           "contig": base[:, :d_in].contiguous(),
                           "transposed": base[:, :d_in].t().contiguous().t(),
                           "strided": base[:, ::2]}
                for w in weights.values():
                    for b in (1, 5):
                        pw = torch.rand(b, d_out, generator=gen)
                        a = torch.rand(b, d_in, generator=gen)
                        score.scores(w, pw, a)
                        select.select_masks([(w, pw, a)], max(1, w.numel() // 3))
        for n in (1, 1000, 4096 + 33):
            m = torch.rand(n, generator=gen) < 0.5
            pack.pack_mask(m)
            pack.unpack_mask(torch.zeros((n + 31) // 32, dtype=torch.int32), n)
        launches.extend(rec)
    return launches


def _ptx_ops(ptx: str) -> tuple[list[str], int]:
    """(atom/red opcodes, number of fences/membars) in a PTX listing."""
    atomics, fences = [], 0
    for line in ptx.splitlines():
        line = line.strip()
        line = re.sub(r"^@!?%p\d+\s+", "", line)  # predicate guard
        m = re.match(r"((?:atom|red)\.[\w.]+)", line)
        if m:
            atomics.append(m.group(1))
        if re.match(r"(fence|membar)\b", line):
            fences += 1
    return atomics, fences


_LOG_RE = re.compile(r"Used (\d+) registers")
_SPILL_RE = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")


def _ptxas_numbers(log: str) -> tuple[int, int] | None:
    regs = [int(x) for x in _LOG_RE.findall(log)]
    spills = [int(a) + int(b) for a, b in _SPILL_RE.findall(log)]
    if not regs:
        return None
    return max(regs), sum(spills)


def compile_one(kernel, launch, arch: int) -> Compiled:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    names = kernel.arg_names
    signature, constexprs, attrs = {}, {}, {}
    for i, (param, value) in enumerate(zip(kernel.params, launch.args)):
        name = names[i]
        if isinstance(value, torch.Tensor):
            signature[name] = "*" + _TRITON_DTYPES[value.dtype]
            if value.data_ptr() % 16 == 0 and not param.do_not_specialize_on_alignment:
                attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(value, int) and not isinstance(value, bool):
            if not param.do_not_specialize and value == 1:
                signature[name] = "constexpr"
                constexprs[(i,)] = 1
            else:
                signature[name] = _int_type(value)
                if not param.do_not_specialize and value % 16 == 0:
                    attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(value, float):
            signature[name] = "fp32"
        else:
            raise TypeError(f"{kernel.__name__}: argument {name} is a {type(value).__name__}")
    for name, value in launch.constexprs.items():
        signature[name] = "constexpr"
        constexprs[(names.index(name),)] = value
    src = ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs)
    t0 = time.perf_counter()
    log = io.StringIO()
    with contextlib.redirect_stdout(log):
        ck = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=dict(launch.options))
    seconds = time.perf_counter() - t0
    cache = os.path.join(os.path.dirname(next(iter(ck.metadata_group.values()))), "dowser-ptxas.json")
    numbers = _ptxas_numbers(log.getvalue())
    if numbers is not None:
        with open(cache, "w") as fh:
            json.dump(numbers, fh)
    elif os.path.exists(cache):  # a cached compile: ptxas did not run this time
        with open(cache) as fh:
            numbers = tuple(json.load(fh))
    else:
        raise RuntimeError(f"{kernel.__name__} sm_{arch}: no ptxas log (set TRITON_DUMP_PTXAS_LOG=1 "
                           "or clear TRITON_CACHE_DIR)")
    atomics, fences = _ptx_ops(ck.asm["ptx"])
    shared = int(getattr(ck.metadata, "shared", 0))
    return Compiled(kernel.__name__, _group_of(launch), arch, numbers[0], numbers[1], shared,
                    seconds, atomics, fences)


def atomic_problems(c: Compiled) -> list[str]:
    """Selection passes: no fence, no acquire/release atomic; global atomics only in HIST and
    relaxed there; no atomic at all elsewhere."""
    if c.kernel not in ("_pass_kernel", "_pass_tile_kernel"):
        return []
    out = []
    mode = c.group[3]
    if c.fences:
        out.append(f"{c.fences} fence/membar instruction(s)")
    for op in sorted(set(c.atomics)):
        parts = op.split(".")
        op = f"{c.atomics.count(op)} x {op}"
        if any(p in ("acq_rel", "acquire", "release", "sc") for p in parts):
            out.append(f"{op}: ordered atomic")
        elif "global" in parts or "shared" not in parts:
            if mode != 0:
                out.append(f"{op}: global atomic outside the HIST pass")
            elif "relaxed" not in parts:
                out.append(f"{op}: global atomic without .relaxed")
    return out


_WORK: list = []


def _compile_index(i: int) -> Compiled:
    launch, arch = _WORK[i]
    return compile_one(launch.kernel, launch, arch)


def _compile_all(todo: list, jobs: int) -> list[Compiled]:
    """Compile in `jobs` forked processes (ptxas and the MLIR passes are CPU-bound)."""
    global _WORK
    _WORK = todo
    if jobs <= 1 or len(todo) < 2:
        return [_compile_index(i) for i in range(len(todo))]
    import multiprocessing

    with multiprocessing.get_context("fork").Pool(jobs) as pool:
        return pool.map(_compile_index, range(len(todo)), chunksize=1)


def check(archs=(80, 90), launches=None, jobs: int | None = None) -> dict:
    """Run the whole check; returns {'ok': bool, 'problems': [...], 'kernels': [...], ...}."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError("dowser.kernels.aot needs real Triton JIT functions: unset TRITON_INTERPRET")
    jobs = min(os.cpu_count() or 1, 4) if jobs is None else jobs
    t0 = time.perf_counter()
    launches = enumerate_launches() if launches is None else launches
    problems = []
    groups: dict[tuple, dict[tuple, object]] = {}
    for launch in launches:
        if launch.options.get("enable_fp_fusion") is None:
            problems.append(f"{launch.kernel.__name__}: launched without enable_fp_fusion pinned")
        groups.setdefault(_group_of(launch), {}).setdefault(
            spec_key(launch.kernel, launch.args, launch.constexprs), launch)
    for group, specs in sorted(groups.items(), key=lambda kv: str(kv[0])):
        if len(specs) > 1:
            problems.append(f"{group}: {len(specs)} compiles for one (kernel, dtype, layout, mode)")
    todo = [(next(iter(specs.values())), arch)
            for _, specs in sorted(groups.items(), key=lambda kv: str(kv[0])) for arch in archs]
    rows = _compile_all(todo, jobs)
    for c in rows:
        if c.n_spills:
            problems.append(f"{c.group} sm_{c.arch}: {c.n_spills} bytes of spills")
        problems.extend(f"{c.group} sm_{c.arch}: {p}" for p in atomic_problems(c))
    return {
        "ok": not problems,
        "problems": problems,
        "launches": len(launches),
        "groups": len(groups),
        "compiles": len(rows),
        "seconds": round(time.perf_counter() - t0, 1),
        "kernels": [{"kernel": c.kernel, "dtype": c.group[1], "layout": c.group[2],
                     "mode": MODE_NAMES.get(c.group[3], c.group[3]) if "pass" in c.kernel else "-",
                     "arch": f"sm_{c.arch}", "regs": c.n_regs, "spills": c.n_spills,
                     "shared": c.shared, "atomics": len(c.atomics),
                     "atomic_ops": sorted(set(c.atomics)), "fences": c.fences,
                     "seconds": round(c.seconds, 2)} for c in rows],
    }


def _table(result: dict) -> str:
    lines = ["kernel              dtype layout mode  arch   regs spills shared atomics fences"]
    for r in result["kernels"]:
        lines.append(f"{r['kernel']:<19} {r['dtype']:<5} {str(r['layout']):<6} {r['mode']:<5} "
                     f"{r['arch']:<6} {r['regs']:>4} {r['spills']:>6} {r['shared']:>6} "
                     f"{r['atomics']:>7} {r['fences']:>6}  {' '.join(r['atomic_ops'])}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", type=int, nargs="+", default=[80, 90])
    ap.add_argument("--json", help="write the full result here")
    ap.add_argument("--jobs", type=int, default=None, help="compile processes (default: CPUs, <= 4)")
    args = ap.parse_args(argv)
    result = check(tuple(args.arch), jobs=args.jobs)
    print(_table(result))
    regs = [r["regs"] for r in result["kernels"]]
    print(f"{result['launches']} launches, {result['groups']} (kernel, dtype, layout, mode) groups, "
          f"{result['compiles']} compiles, registers {min(regs)}-{max(regs)}, "
          f"spills {sum(r['spills'] for r in result['kernels'])}, {result['seconds']} s")
    for p in result["problems"]:
        print("PROBLEM:", p)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(result, fh, indent=1)
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
