"""Will it fit? A memory planner for full-depth fine-tuning, from a model config alone.

`plan_memory(model_or_config, ...)` builds the model on the meta device (no weights, no
download beyond a config), counts its parameters and the tensors autograd saves in one
forward pass (through `torch.autograd.graph.saved_tensors_hooks`, with the attention
saving what flash / memory-efficient attention saves: q, k, v, output, logsumexp), and adds
up, per GPU, for each training configuration:

- weights (all parameters, in the training dtype),
- gradients (every trainable parameter's, dense in the parameter dtype; with dowser's
  step_in_backward only one parameter's at a time),
- optimizer state: torch AdamW on bf16 parameters (bf16 moments, no master: loses small
  updates), torch AdamW in mixed precision (fp32 master + fp32 moments: 12 B per trainable
  parameter), dowser compact (8 B per trainable entry + 4 B per 32 entries of prefix sums,
  + 4 B per trainable entry of fp32 master for bf16/fp16),
- masks (4 B per 32 entries),
- activations (with or without gradient checkpointing) and the backward-pass transients
  (logit gradients, one layer's workspace),
- a fixed overhead (CUDA context and allocator slack on GPU; the process's own memory on
  CPU, which the caller measures),

and the probing peak (forward + backward with no parameter gradients, on the probe batch).
Under DDP each GPU holds everything; under FSDP2 weights, gradients, state and masks are
sharded over the GPUs, plus the unsharded weights of two decoder layers (the current one and
the prefetched one) and one layer's unsharded gradients.

The peak of a training step is taken at the two ends of the backward pass: at its start all
activations are alive (and the logit gradients), at its end all gradients; in between one
set is freed as the other grows, layer by layer. Trainable set: every parameter of the tuned
decoder layers (the paper's setting: embeddings, lm_head and the rest frozen), the same for
torch AdamW and dowser.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

__all__ = ["plan_memory", "MemoryPlan", "PlanRow", "ModelCounts", "count_model"]

GiB = 1024 ** 3
_DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16,
           "float16": torch.float16, "half": torch.float16, "fp32": torch.float32,
           "float32": torch.float32, "float": torch.float32}


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """'bf16' | 'fp16' | 'fp32' (or a torch dtype) -> torch dtype; ValueError otherwise."""
    if isinstance(dtype, torch.dtype):
        if dtype not in (torch.bfloat16, torch.float16, torch.float32):
            raise ValueError(f"dtype must be bf16, fp16 or fp32, got {dtype}")
        return dtype
    if not isinstance(dtype, str) or dtype.lower() not in _DTYPES:
        raise ValueError(f"dtype must be one of bf16, fp16, fp32, got {dtype!r}")
    return _DTYPES[dtype.lower()]


# ---- the model, on the meta device ----------------------------------------------------------

def load_config(source: Any) -> Any:
    """A transformers config from a model directory, a config JSON file, a .gguf file, a dict,
    a PretrainedConfig or a model with `.config`. Raises ValueError with one line otherwise."""
    from transformers import AutoConfig, PretrainedConfig

    if isinstance(source, PretrainedConfig):
        return source
    if isinstance(source, nn.Module):
        cfg = getattr(source, "config", None)
        if cfg is None:
            raise ValueError(f"plan_memory: {type(source).__name__} has no .config; pass a "
                             "Hugging Face model, config or config path")
        return cfg
    if isinstance(source, dict):
        d = dict(source)
        if "model_type" not in d:
            raise ValueError("plan_memory: a config dict needs a 'model_type' (e.g. 'llama')")
        return AutoConfig.for_model(d.pop("model_type"), **d)
    if isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        if not os.path.exists(path):
            raise ValueError(f"plan_memory: {path!r} does not exist (a model directory, a "
                             "config .json or a .gguf file)")
        if path.endswith(".gguf"):
            return AutoConfig.from_pretrained(os.path.dirname(os.path.abspath(path)),
                                              gguf_file=os.path.basename(path))
        if os.path.isdir(path):
            if not os.path.isfile(os.path.join(path, "config.json")):
                ggufs = [f for f in os.listdir(path) if f.endswith(".gguf")]
                if len(ggufs) == 1:
                    return AutoConfig.from_pretrained(path, gguf_file=ggufs[0])
                raise ValueError(f"plan_memory: {path!r} has no config.json")
            return AutoConfig.from_pretrained(path)
        try:
            with open(path) as f:
                d = json.load(f)
        except (OSError, json.JSONDecodeError) as exc:
            raise ValueError(f"plan_memory: cannot read {path!r} as a config JSON: {exc}") from None
        if not isinstance(d, dict):
            raise ValueError(f"plan_memory: {path!r} is not a JSON object")
        return load_config(d)
    raise ValueError(f"plan_memory: cannot plan for a {type(source).__name__}; pass a model "
                     "directory, config JSON path, dict, PretrainedConfig or Hugging Face model")


def meta_model(config: Any, dtype: torch.dtype) -> nn.Module:
    """The causal-LM model of `config` on the meta device (no memory, no weights)."""
    from transformers import AutoModelForCausalLM

    try:
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(config, dtype=dtype)
    except (ValueError, KeyError, TypeError) as exc:
        first = (str(exc).strip().splitlines() or [""])[0]
        raise ValueError(f"plan_memory: cannot build a causal LM from this config "
                         f"({type(config).__name__}): {first[:200]}") from None


_SDPA = torch.nn.functional.scaled_dot_product_attention


class _FlashSaved(torch.autograd.Function):
    """Attention that saves what flash / memory-efficient attention saves (q, k, v, the
    output in (batch, seq, heads, dim) memory order, fp32 logsumexp), never the seq x seq
    weights; the meta device's own SDPA would take the math path and save those."""

    @staticmethod
    def forward(ctx, q, k, v, _unused):
        b, h, s, _ = q.shape
        out = q.new_empty((b, s, h, v.shape[-1])).transpose(1, 2)
        lse = torch.empty((b, h, s), dtype=torch.float32, device=q.device)
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    def backward(ctx, grad):  # pragma: no cover - only forward passes are counted
        raise RuntimeError("counting only")


def _flash_sdpa(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                enable_gqa=False):
    return _FlashSaved.apply(q, k, v, None)


@contextlib.contextmanager
def _flash_attention():
    torch.nn.functional.scaled_dot_product_attention = _flash_sdpa
    try:
        yield
    finally:
        torch.nn.functional.scaled_dot_product_attention = _SDPA


def _saved_bytes(model: nn.Module, batch: int, seq: int, layers: nn.ModuleList,
                 probe: bool = False) -> tuple[list[int], int]:
    """Bytes autograd saves in one forward pass with labels (the loss included), per decoder
    layer and outside them. Parameters themselves are not counted; tensors sharing storage
    once. probe: no parameter gradients, the gradient flows from the embeddings' output
    (what dowser.probe's backward keeps)."""
    params = {p.untyped_storage()._cdata for p in model.parameters()}
    where = {"layer": -1}
    per_layer = [0] * len(layers)
    outside = 0
    seen: set[int] = set()

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal outside
        key = t.untyped_storage()._cdata
        if key in params or key in seen:
            return t
        seen.add(key)
        nbytes = t.untyped_storage().nbytes()
        if where["layer"] >= 0:
            per_layer[where["layer"]] += nbytes
        else:
            outside += nbytes
        return t

    handles = []
    for i, layer in enumerate(layers):
        handles.append(layer.register_forward_pre_hook(lambda m, a, i=i: where.update(layer=i)))
        handles.append(layer.register_forward_hook(lambda m, a, o: where.update(layer=-1)))
    grads = {p: p.requires_grad for p in model.parameters()}
    if probe:
        for p in grads:
            p.requires_grad_(False)
        emb = model.get_input_embeddings()
        handles.append(emb.register_forward_hook(lambda m, a, o: o.requires_grad_(True)))
    ids = torch.zeros((batch, seq), dtype=torch.long, device="meta")
    try:
        with _flash_attention(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(input_ids=ids, labels=None if probe else ids)
    except (RuntimeError, NotImplementedError, TypeError) as exc:
        first = (str(exc).strip().splitlines() or [""])[0]
        raise ValueError(f"plan_memory: cannot run {type(model).__name__} on the meta device to "
                         f"count its activations ({type(exc).__name__}: {first[:200]})") from None
    finally:
        for h in handles:
            h.remove()
        for p, g in grads.items():
            p.requires_grad_(g)
    return per_layer, outside


@dataclass
class ModelCounts:
    """What the planner knows about a model (from its meta-device copy)."""

    name: str
    n_params: int  # all parameters (tied ones once)
    trainable: int  # parameters of the tuned decoder layers
    masked: list[int]  # entries of each masked matrix (the targeted linear weights)
    layer_params: int  # parameters of one (the largest) tuned decoder layer
    largest_param: int  # entries of the largest trainable parameter
    n_layers: int
    tuned_layers: int
    hidden: int
    intermediate: int
    vocab: int
    dtype: torch.dtype


def count_model(source: Any, *, layers: int | str = "all", dtype: str | torch.dtype = "bf16"
                ) -> tuple[ModelCounts, nn.Module, nn.ModuleList]:
    """Parameter counts of `source` on the meta device, the trainable set being every
    parameter of the last `layers` decoder layers ("all": every layer)."""
    from dowser.probe import decoder_layers, find_targets

    dt = parse_dtype(dtype)
    config = load_config(source)
    model = meta_model(config, dt)
    prefix, layer_list = decoder_layers(model)
    n = len(layer_list)
    if layers == "all" or layers is None:
        tuned = n
    elif isinstance(layers, bool) or not isinstance(layers, int) or not 1 <= layers <= n:
        raise ValueError(f"layers must be 'all' or an int in [1, {n}], got {layers!r}")
    else:
        tuned = layers
    targets = find_targets(model, layers=tuned)
    modules = dict(model.named_modules())
    masked = [modules[t].weight.numel() for t in targets]
    trainable_ids = set()
    largest_layer = 0
    for i in range(n - tuned, n):
        ps = list(layer_list[i].parameters())
        largest_layer = max(largest_layer, sum(p.numel() for p in ps))
        trainable_ids.update(id(p) for p in ps)
    for p in model.parameters():
        p.requires_grad_(id(p) in trainable_ids)
    trainable = [p for p in model.parameters() if p.requires_grad]
    text = getattr(config, "get_text_config", lambda: config)()
    if isinstance(source, (str, os.PathLike)):
        name = os.path.basename(os.path.normpath(os.fspath(source)))
    else:
        name = getattr(config, "_name_or_path", "") or type(model).__name__
    counts = ModelCounts(
        name=name,
        n_params=sum(p.numel() for p in model.parameters()),
        trainable=sum(p.numel() for p in trainable), masked=masked, layer_params=largest_layer,
        largest_param=max((p.numel() for p in trainable), default=0), n_layers=n,
        tuned_layers=tuned, hidden=int(getattr(text, "hidden_size", 0) or 0),
        intermediate=int(getattr(text, "intermediate_size", 0) or 0),
        vocab=int(getattr(text, "vocab_size", 0) or 0), dtype=dt)
    return counts, model, layer_list


# ---- the plan -------------------------------------------------------------------------------

@dataclass
class PlanRow:
    """One configuration's memory per GPU (bytes) and verdict."""

    optimizer: str  # "torch AdamW (bf16 state)", "torch AdamW (fp32 master)", "dowser ..."
    parallel: str  # "single", "DDP", "FSDP2"
    checkpointing: bool
    parts: dict[str, float]  # weights, gradients, optimizer state, masks, activations, ...
    peak: float
    limit: float

    @property
    def fits(self) -> bool:
        return self.peak <= self.limit

    @property
    def headroom(self) -> float:
        return self.limit - self.peak


@dataclass
class MemoryPlan:
    """The planner's answer: one PlanRow per configuration plus the probing peak."""

    counts: ModelCounts
    rows: list[PlanRow]
    probe_peak: float
    settings: dict[str, Any]

    def row(self, optimizer: str, checkpointing: bool = False, parallel: str | None = None) -> PlanRow:
        """The row of `optimizer` (exact name or unique prefix)."""
        par = parallel or self.rows[0].parallel
        hits = [r for r in self.rows if r.checkpointing == checkpointing and r.parallel == par
                and (r.optimizer == optimizer or r.optimizer.startswith(optimizer))]
        if len(hits) != 1:
            raise KeyError(f"no unique row {optimizer!r} (checkpointing={checkpointing}, {par})")
        return hits[0]

    def table(self, parts: bool = True) -> str:
        """A markdown table (GiB), one row per configuration."""
        keys = ["weights", "gradients", "optimizer state", "masks", "activations", "transients",
                "overhead"]
        head = ["optimizer", "parallel", "grad ckpt"] + (keys if parts else []) + [
            "peak GiB", f"fits in {self.settings['gpu_mem_gb']:g} GiB", "headroom GiB"]
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for r in self.rows:
            cells = [r.optimizer, r.parallel, "yes" if r.checkpointing else "no"]
            if parts:
                cells += [f"{r.parts.get(k, 0) / GiB:.2f}" for k in keys]
            cells += [f"{r.peak / GiB:.2f}", "**yes**" if r.fits else "no", f"{r.headroom / GiB:+.2f}"]
            lines.append("| " + " | ".join(cells) + " |")
        return "\n".join(lines)

    def summary(self) -> str:
        c, s = self.counts, self.settings
        return (f"{c.name}: {c.n_params / 1e9:.2f} B parameters, {c.tuned_layers}/{c.n_layers} "
                f"decoder layers tuned ({c.trainable / 1e9:.2f} B trainable, {len(c.masked)} "
                f"masked matrices, rho={s['rho']}), {s['dtype']}, batch {s['batch']} x seq "
                f"{s['seq']} per GPU, {s['gpus']} GPU(s) of {s['gpu_mem_gb']:g} GiB "
                f"({s['device']}; overhead {s['overhead_gb']:g} GiB). Probing peak "
                f"(batch {s['probe_batch']} x {s['probe_seq']}): {self.probe_peak / GiB:.2f} GiB.")

    def __str__(self) -> str:
        return self.summary() + "\n\n" + self.table()

    def to_dict(self) -> dict[str, Any]:
        return {"settings": self.settings, "probe_peak_bytes": self.probe_peak,
                "rows": [{"optimizer": r.optimizer, "parallel": r.parallel,
                          "checkpointing": r.checkpointing, "parts": r.parts, "peak": r.peak,
                          "fits": r.fits, "headroom": r.headroom} for r in self.rows]}


OPTIMIZERS = ("torch AdamW (param-dtype state)", "torch AdamW (fp32 master + state)",
              "dowser (compact)", "dowser (compact, step_in_backward)")


def _check_args(rho, batch, seq, gpu_mem_gb, gpus, parallel, device, probe_batch, probe_seq,
                overhead_gb) -> None:
    if isinstance(rho, bool) or not isinstance(rho, (int, float)) or not 0.0 <= rho <= 1.0:
        raise ValueError(f"rho must be a number in [0, 1], got {rho!r}")
    for name, v in (("batch", batch), ("seq", seq), ("gpus", gpus), ("probe_batch", probe_batch),
                    ("probe_seq", probe_seq)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be an int >= 1, got {v!r}")
    if isinstance(gpu_mem_gb, bool) or not isinstance(gpu_mem_gb, (int, float)) or \
            not math.isfinite(gpu_mem_gb) or gpu_mem_gb <= 0:
        raise ValueError(f"gpu_mem must be a number of GiB > 0, got {gpu_mem_gb!r}")
    if parallel not in (None, "ddp", "fsdp2"):
        raise ValueError(f"parallel must be None (both when gpus > 1), 'ddp' or 'fsdp2', got {parallel!r}")
    if device not in ("cuda", "cpu"):
        raise ValueError(f"device must be 'cuda' or 'cpu', got {device!r}")
    if overhead_gb is not None and (not isinstance(overhead_gb, (int, float)) or overhead_gb < 0):
        raise ValueError(f"overhead_gb must be a number >= 0, got {overhead_gb!r}")


def plan_memory(model: Any, *, rho: float = 0.1, layers: int | str = "all",
                dtype: str | torch.dtype = "bf16", batch: int = 8, seq: int = 2048,
                gpu_mem: float = 80.0, gpus: int = 1, parallel: str | None = None,
                master_weights: bool | None = None, device: str = "cuda",
                overhead_gb: float | None = None, probe_batch: int = 4, probe_seq: int = 64,
                optimizers: tuple[str, ...] = OPTIMIZERS,
                checkpointing: tuple[bool, ...] = (False, True)) -> MemoryPlan:
    """Plan the memory of fine-tuning `model` (a model directory, config JSON path, .gguf
    file, config dict, PretrainedConfig or Hugging Face model; only its config is used).

    Args:
        rho: trainable fraction per masked matrix (dowser rows).
        layers: "all" (full depth) or the number of last decoder layers tuned.
        dtype: training dtype of the weights: "bf16", "fp16" or "fp32".
        batch, seq: micro-batch per GPU and sequence length.
        gpu_mem: memory per GPU in GiB (the verdict's limit).
        gpus: number of GPUs; > 1 plans DDP and FSDP2 (or only `parallel`).
        master_weights: dowser's fp32 master copy of the trainable entries (None: on for
            bf16/fp16, like MaskedAdamW).
        device: "cuda" (default overhead 1 GiB: context + allocator slack) or "cpu" (the
            measured setup: overhead 0 unless given, e.g. the process's memory before the model).
        overhead_gb: override the fixed overhead.
        probe_batch, probe_seq: the probing pass (dowser.probe defaults: 4 prompts of 64 tokens).
        optimizers: which rows (names in `OPTIMIZERS`).
        checkpointing: plan without and/or with gradient checkpointing.

    Returns a MemoryPlan (print it for the table; `.row(...)` for one configuration).
    """
    _check_args(rho, batch, seq, gpu_mem, gpus, parallel, device, probe_batch, probe_seq,
                overhead_gb)
    for o in optimizers:
        if o not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer row {o!r}; choose from {OPTIMIZERS}")
    counts, meta, layer_list = count_model(model, layers=layers, dtype=dtype)
    e = torch.empty((), dtype=counts.dtype).element_size()
    low = counts.dtype in (torch.bfloat16, torch.float16)
    master = low and master_weights is not False
    overhead = (1.0 if device == "cuda" else 0.0) if overhead_gb is None else float(overhead_gb)
    overhead *= GiB

    per_layer, outside = _saved_bytes(meta, batch, seq, layer_list)
    p_layer, p_outside = _saved_bytes(meta, probe_batch, probe_seq, layer_list, probe=True)
    tuned_first = counts.n_layers - counts.tuned_layers
    acts_full = sum(per_layer) + outside
    # checkpointing: each tuned layer keeps its input; one layer is recomputed at a time
    layer_in = batch * seq * counts.hidden * e
    acts_ckpt = (sum(per_layer[:tuned_first]) + counts.tuned_layers * layer_in
                 + max(per_layer[tuned_first:], default=0) + outside)
    tokens = batch * seq
    # the returned logits (param dtype) stay alive; at the start of backward the fp32 logit
    # gradient and its cast to the logits' dtype (and, for bf16, the fp32 upcast's gradient)
    logits_out = tokens * counts.vocab * e
    t_logits = tokens * counts.vocab * (8 + (e if e < 4 else 0))
    # one layer's backward: gradients of its widest intermediates (MLP: three b*s*I tensors)
    # and the fp32 norm gradients
    w_bwd = 3 * tokens * max(counts.intermediate, counts.hidden) * e + 2 * tokens * counts.hidden * 4

    masked_n = counts.masked
    masked_total = sum(masked_n)
    k_total = sum(math.floor(rho * n + 0.5) for n in masked_n)
    words = sum((n + 31) // 32 for n in masked_n)
    dense_trainable = counts.trainable - masked_total  # norms/biases of the tuned layers
    mask_bytes = 4 * words

    pars = [parallel] if parallel else (["ddp", "fsdp2"] if gpus > 1 else [None])
    rows: list[PlanRow] = []
    for par in pars:
        shard = gpus if par == "fsdp2" else 1
        label = {"ddp": "DDP", "fsdp2": "FSDP2", None: "single"}[par]
        weights = counts.n_params * e / shard
        if par == "fsdp2":  # two layers unsharded at a time (current + prefetched)
            weights += 2 * counts.layer_params * e * (1 - 1 / shard)
        for opt in optimizers:
            sib = "step_in_backward" in opt
            if sib and par is not None:
                continue  # not with DDP (un-reduced gradients) nor FSDP2 (dowser refuses)
            if opt.startswith("torch"):
                if "master" in opt:
                    if not low:
                        continue  # fp32 parameters: the param-dtype row is the same thing
                    state = 12 * counts.trainable
                else:
                    state = 2 * counts.trainable * e
                masks = 0.0
            else:
                per_k = 8 + (4 if master else 0)
                state = per_k * k_total + 4 * words + per_k * dense_trainable
                masks = mask_bytes
            state /= shard
            masks /= shard
            if sib:
                grads = counts.largest_param * e
            else:
                grads = counts.trainable * e / shard
                if par == "fsdp2":  # one layer's unsharded gradients before reduce-scatter
                    grads += counts.layer_params * e
            step_tmp = 2 * counts.largest_param * 4  # a step's per-tensor fp32 temporaries
            for ckpt in checkpointing:
                acts = (acts_ckpt if ckpt else acts_full) + logits_out
                static = weights + state + masks + overhead
                recompute = max(per_layer[tuned_first:], default=0) if ckpt else 0
                if sib:
                    dyn = acts + max(t_logits, w_bwd) + grads + step_tmp
                else:
                    dyn = max(acts + max(t_logits, w_bwd), grads + w_bwd + recompute,
                              grads + step_tmp)
                peak = static + dyn
                parts = {"weights": weights, "gradients": grads, "optimizer state": state,
                         "masks": masks, "activations": acts,
                         "transients": peak - static - acts - (grads if sib else 0),
                         "overhead": overhead}
                if not sib:  # the peak holds activations or gradients, whichever is larger
                    parts["transients"] = peak - static - max(acts, grads)
                rows.append(PlanRow(opt, label, ckpt, parts, peak, gpu_mem * GiB))

    # probing: weights, the probe pass's saved tensors and logits, the factors (fp32,
    # 16 probe batches x (d_out + d_in) per matrix)
    probe_acts = sum(p_layer) + p_outside
    probe_tokens = probe_batch * probe_seq
    factors = 0
    modules = dict(meta.named_modules())
    from dowser.probe import find_targets

    for t in find_targets(meta, layers=counts.tuned_layers):
        w = modules[t].weight
        factors += 2 * 16 * (w.shape[0] + w.shape[1]) * 4
    probe_peak = (counts.n_params * e + probe_acts + probe_tokens * counts.vocab * (e + 8)
                  + factors + overhead)
    settings = dict(rho=rho, layers=layers, dtype=str(counts.dtype).replace("torch.", ""),
                    batch=batch, seq=seq, gpu_mem_gb=gpu_mem, gpus=gpus, parallel=parallel,
                    master_weights=master, device=device, overhead_gb=overhead / GiB,
                    probe_batch=probe_batch, probe_seq=probe_seq)
    return MemoryPlan(counts, rows, probe_peak, settings)
