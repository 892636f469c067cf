"""dowser under torch.distributed: probing split over ranks, exact masks over sharded weights,
masked optimizers on FSDP2 shards, and distributed checkpoints.

Everything here is used through the public entry points, which switch to it by themselves when
a process group is initialised with more than one rank:

- `dowser.probe` gives batch b to rank b % world (its prompts and xi draws derive from
  (seed, b) alone) and all-gathers the factors, so every rank ends with the ProbeStats one
  process would compute.
- `dowser.build_masks` on replicated weights spreads the matrices over ranks (per-matrix
  scope) and broadcasts the packed masks; on weights sharded on dim 0 (FSDP2 DTensors), and
  for the global scope, each rank scores only its rows and one all-reduce per radix pass sums
  the histograms, so the thresholds are exact, bit for bit those of one process.
- `MaskedAdamW` / `MaskedSGD` step each DTensor parameter on its local shard, with the rows of
  the full mask re-packed for that shard once at construction; compact state is per shard.
- `save_checkpoint` / `load_checkpoint` write model, optimizer state and masks with
  `torch.distributed.checkpoint`; optimizer state is stored densely laid out as DTensors placed
  like their parameters, so a checkpoint loads on another number of ranks too.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from dowser import _bits
from dowser._checks import check_finite, words_for

__all__ = ["is_active", "rank_and_world", "local_tensor", "local_rows", "shard_mask",
           "select_masks_sharded", "save_checkpoint", "load_checkpoint"]

_CHUNK = 1 << 20  # scores held at once per radix pass (entries)
_RADIX_BITS = 8


def is_active(group: Any = None) -> bool:
    """True when a process group with more than one rank is initialised."""
    dist = torch.distributed
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1


def rank_and_world(group: Any = None) -> tuple[int, int]:
    """(rank, world size) of the default group, (0, 1) without one."""
    if not is_active(group):
        return 0, 1
    return torch.distributed.get_rank(group), torch.distributed.get_world_size(group)


def _comm_device(group: Any = None) -> torch.device:
    """Where collectives want their tensors: the current GPU for NCCL, else the CPU."""
    backend = torch.distributed.get_backend(group)
    if "nccl" in str(backend) and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _is_dtensor(t: Any) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch without DTensor
        return False
    return isinstance(t, DTensor)


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """The rank-local part of a DTensor (sharing its storage), or `t` itself."""
    return t.to_local() if _is_dtensor(t) else t


def local_rows(t: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(local tensor, index of its first row in the full tensor).

    Plain tensors and replicated DTensors are whole (offset 0). A DTensor sharded on dim 0
    (FSDP2's layout) gives its shard; any other placement is refused.
    """
    if not _is_dtensor(t):
        return t, 0
    from torch.distributed.tensor import Replicate, Shard

    placements = tuple(t.placements)
    if all(isinstance(p, Replicate) for p in placements):
        return t.to_local(), 0
    if len(placements) != 1 or not isinstance(placements[0], Shard) or placements[0].dim != 0:
        raise ValueError(f"dowser supports DTensors sharded on dim 0 over a 1-D mesh (FSDP2) or "
                         f"replicated; got placements {placements}")
    local = t.to_local()
    try:
        from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

        _, offset = compute_local_shape_and_global_offset(t.shape, t.device_mesh, placements)
        return local, int(offset[0])
    except ImportError:  # torch.chunk semantics, which FSDP2 uses
        coord = t.device_mesh.get_coordinate()[0]
        return local, min(coord * math.ceil(t.shape[0] / t.device_mesh.size()), t.shape[0])


def shard_mask(packed: torch.Tensor, shape: Sequence[int], row0: int, rows: int) -> torch.Tensor:
    """Re-pack rows [row0, row0 + rows) of a packed mask over `shape` as a mask of their own
    (a shard's first row rarely starts on a 32-bit word boundary)."""
    shape = tuple(shape)
    per_row = math.prod(shape[1:]) if len(shape) > 1 else 1
    n = math.prod(shape)
    if not 0 <= row0 <= row0 + rows <= (shape[0] if shape else 1):
        raise ValueError(f"rows [{row0}, {row0 + rows}) outside a tensor of shape {shape}")
    bits = torch.ops.dowser.unpack_mask(packed, n)
    return torch.ops.dowser.pack_mask(bits[row0 * per_row:(row0 + rows) * per_row].contiguous())


# ---- collectives --------------------------------------------------------------------------

def all_gather_rows(local: torch.Tensor, group: Any = None) -> list[torch.Tensor]:
    """Every rank's `local` (n_r, ...) tensor, n_r may differ between ranks (padded on the
    wire); returned on `local`'s device, in rank order."""
    dist = torch.distributed
    _, world = rank_and_world(group)
    dev = _comm_device(group)
    n = torch.tensor([local.shape[0]], dtype=torch.int64, device=dev)
    sizes = [torch.zeros_like(n) for _ in range(world)]
    dist.all_gather(sizes, n, group=group)
    sizes = [int(s) for s in sizes]
    top = max(sizes)
    buf = torch.zeros((top, *local.shape[1:]), dtype=local.dtype, device=dev)
    buf[: local.shape[0]] = local.to(dev)
    out = [torch.empty_like(buf) for _ in range(world)]
    dist.all_gather(out, buf, group=group)
    return [o[:s].to(local.device) for o, s in zip(out, sizes)]


def broadcast_masks(masks: list[torch.Tensor | None], owners: list[int], numels: list[int],
                    devices: list[torch.device], group: Any = None) -> list[torch.Tensor]:
    """Share packed masks built by their owner ranks: one broadcast per owner of the
    concatenation of its masks."""
    dist = torch.distributed
    rank, world = rank_and_world(group)
    dev = _comm_device(group)
    words = [words_for(n) for n in numels]
    out: list[torch.Tensor | None] = [None] * len(masks)
    for owner in range(world):
        idx = [i for i, o in enumerate(owners) if o == owner]
        if not idx:
            continue
        if owner == rank:
            flat = torch.cat([masks[i].to(dev) for i in idx])
        else:
            flat = torch.empty(sum(words[i] for i in idx), dtype=torch.int32, device=dev)
        dist.broadcast(flat, src=dist.get_global_rank(group, owner) if group is not None else owner,
                       group=group)
        for i, part in zip(idx, flat.split([words[i] for i in idx])):
            out[i] = part.to(devices[i]).clone()
    return out  # type: ignore[return-value]


# ---- exact bottom-k over row-sharded matrices ----------------------------------------------

def _key_chunks(weight, psi, a, bw):
    """Order-preserving score keys of `weight`'s rows, _CHUNK entries at a time (never the
    whole score matrix): the same `dowser::scores` op, hence the same fp32 bits, as
    single-process selection on this backend."""
    rows, cols = weight.shape
    step = max(1, _CHUNK // max(cols, 1))
    for r0 in range(0, rows, step):
        r1 = min(rows, r0 + step)
        s = torch.ops.dowser.scores(weight[r0:r1], psi[:, r0:r1].contiguous(), a, bw)
        yield _bits.score_keys(s).reshape(-1)


def select_masks_sharded(parts: Sequence[tuple], groups: Sequence[int], ks: Sequence[int],
                         group: Any = None) -> list[torch.Tensor]:
    """Exact bottom-k selection over matrices whose rows are spread over ranks.

    parts: this rank's (weight_rows, out_factors_rows, in_factors, batch_weights) of every
        matrix, in the same matrix order on every rank; a rank's rows of a matrix come after
        those of lower ranks (dim-0 sharding), and may be none.
    groups: the selection group of each matrix (per-matrix scope: one group per matrix; global
        scope: one group for all); ks: k of each group over all ranks.
    Returns this rank's rows of each matrix as a flat bool tensor (True = trainable). Ties are
    taken by matrix order, then row-major flat index, exactly as `dowser.ops.build_masks_global`.
    Collectives: one all-reduce of the (groups x 256) histogram per 8-bit radix pass (4 passes),
    one all-gather of tie counts.
    """
    dist = torch.distributed
    rank, world = rank_and_world(group)
    dev = _comm_device(group) if world > 1 else torch.device("cpu")
    n_groups = len(ks)
    want = torch.tensor(list(ks), dtype=torch.int64)  # 1-based rank of the threshold key
    prefix = torch.zeros(n_groups, dtype=torch.int64)
    nbins = 1 << _RADIX_BITS
    for shift in range(32 - _RADIX_BITS, -1, -_RADIX_BITS):
        hist = torch.zeros(n_groups, nbins, dtype=torch.int64)
        for (w, psi, a, bw), g in zip(parts, groups):
            if w.shape[0] == 0 or int(want[g]) == 0:
                continue
            high = int(prefix[g]) >> (shift + _RADIX_BITS)
            for keys in _key_chunks(w, psi, a, bw):
                if shift + _RADIX_BITS < 32:
                    keys = keys[(keys >> (shift + _RADIX_BITS)) == high]
                hist[g] += torch.bincount(((keys >> shift) & (nbins - 1)).cpu(), minlength=nbins)
        if world > 1:
            hist = hist.to(dev)
            dist.all_reduce(hist, group=group)
            hist = hist.cpu()
        cum = hist.cumsum(1)
        digit = (cum < want[:, None]).sum(1).clamp(max=nbins - 1)
        before = torch.where(digit > 0, cum.gather(1, (digit - 1).clamp(min=0)[:, None])[:, 0], 0)
        want = torch.where(want > 0, want - before, want)
        prefix |= digit << shift
    # prefix: the threshold key T of each group; want: how many entries equal to T to take.
    counts = torch.zeros(len(parts), dtype=torch.int64)
    for i, ((w, psi, a, bw), g) in enumerate(zip(parts, groups)):
        if w.shape[0] and int(want[g]) > 0:
            counts[i] = sum(int((keys == prefix[g]).sum()) for keys in _key_chunks(w, psi, a, bw))
    if world > 1:
        everyone = [c.cpu() for c in all_gather_rows(counts.to(dev)[None], group)]
        table = torch.cat(everyone)  # (world, parts)
    else:
        table = counts[None]
    out = []
    for i, ((w, psi, a, bw), g) in enumerate(zip(parts, groups)):
        # ties before this rank's rows of matrix i: all ranks on earlier matrices of the group,
        # lower ranks on this one
        earlier = [j for j in range(i) if groups[j] == g]
        taken = int(table[:, earlier].sum()) + int(table[:rank, i].sum())
        quota = max(0, min(int(want[g]) - taken, int(table[rank, i])))
        bits = torch.zeros(w.numel(), dtype=torch.bool, device=w.device)
        if int(ks[g]) > 0 and w.shape[0]:
            pos, seen = 0, 0
            for keys in _key_chunks(w, psi, a, bw):
                tie = keys == prefix[g]
                take = keys < prefix[g]
                if quota > seen:
                    order = tie.cumsum(0) + seen  # 1-based index among this shard's ties
                    take |= tie & (order <= quota)
                seen += int(tie.sum())
                bits[pos:pos + keys.numel()] = take.to(bits.device)
                pos += keys.numel()
        out.append(bits)
    return out


def gather_rows_mask(bits: torch.Tensor, n: int, device: torch.device, group: Any = None
                     ) -> torch.Tensor:
    """Packed mask of a whole matrix from every rank's flat bool rows (in rank order)."""
    parts = all_gather_rows(bits.to(torch.uint8), group) if is_active(group) else [bits]
    full = torch.cat([p.to(device).bool() for p in parts])
    if full.numel() != n:
        raise RuntimeError(f"gathered {full.numel()} mask entries, expected {n}")
    return torch.ops.dowser.pack_mask(full)


def build_masks(layers: Sequence[tuple], full_shapes: Sequence[tuple], rho: float, scope: str,
                group: Any = None) -> list[torch.Tensor]:
    """Packed full masks of every layer on every rank.

    layers: (weight, rows_factor, cols_factor, batch_weights) per matrix, weight possibly a
    DTensor sharded on dim 0 (rows_factor covers all rows). Replicated weights at per-matrix
    scope: matrix i is built by rank i % world with dowser.ops.build_mask and broadcast;
    otherwise each rank selects over its rows (select_masks_sharded).
    """
    from dowser import ops

    rank, world = rank_and_world(group)
    sharded = any(_is_dtensor(w) and local_rows(w)[0].shape != w.shape for w, *_ in layers)
    numels = [math.prod(s) for s in full_shapes]
    if scope == "matrix" and not sharded:
        owners = [i % world for i in range(len(layers))]
        mine = [ops.build_mask(local_tensor(w), o, i, rho, batch_weights=bw)
                if owners[j] == rank else None for j, (w, o, i, bw) in enumerate(layers)]
        return broadcast_masks(mine, owners, numels, [local_tensor(w).device for w, *_ in layers],
                               group)
    parts = []
    for idx, (w, o, i, bw) in enumerate(layers):
        loc, row0 = local_rows(w)
        check_finite(f"layers[{idx}].weight (this rank's shard)", loc)
        if not _is_dtensor(w):  # replicated: split the rows evenly, as dim-0 sharding would
            per = math.ceil(loc.shape[0] / world)
            row0 = min(rank * per, loc.shape[0])
            loc = loc[row0:row0 + per]
        loc = loc.detach()
        parts.append((loc, o[:, row0:row0 + loc.shape[0]].to(loc.device), i.to(loc.device),
                      bw.to(loc.device)))
    if scope == "global":
        groups, ks = [0] * len(layers), [ops._k_for(rho, sum(numels))]
    else:
        groups, ks = list(range(len(layers))), [ops._k_for(rho, n) for n in numels]
    bits = select_masks_sharded(parts, groups, ks, group)
    return [gather_rows_mask(b, n, local_tensor(w).device, group)
            for b, n, (w, *_) in zip(bits, numels, layers)]


# ---- checkpoints ---------------------------------------------------------------------------

def _optimizer_names(optimizer, model) -> dict:
    names = {p: n for n, p in model.named_parameters()}
    out = {}
    for gi, g in enumerate(optimizer.param_groups):
        for pi, p in enumerate(g["params"]):
            out[p] = names.get(p, f"param_groups.{gi}.{pi}")
    return out


def _as_placed(dense_local: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    if not _is_dtensor(p):
        return dense_local
    from torch.distributed.tensor import DTensor

    return DTensor.from_local(dense_local, p.device_mesh, p.placements, shape=p.shape,
                              stride=p.stride(), run_check=False)


def optimizer_state_dict(optimizer, model: torch.nn.Module) -> dict[str, Any]:
    """A checkpointable view of a MaskedAdamW / MaskedSGD state: per parameter name, each state
    tensor densely laid out (zeros at frozen entries) and placed like its parameter (a DTensor
    for FSDP2 parameters), plus the step counters and the groups' hyper-parameters. Parameters
    without state yet get zeros, so the same call builds the template `dcp.load` fills."""
    out: dict[str, Any] = {"state": {}, "param_groups": []}
    names = _optimizer_names(optimizer, model)
    for g in optimizer.param_groups:
        out["param_groups"].append({k: v for k, v in g.items() if k != "params"})
        for p in g["params"]:
            loc = local_tensor(p)
            st = optimizer.state.get(p, {})
            entry: dict[str, Any] = {"step": st.get("step", torch.tensor(0.0)).detach().clone()}
            for key in optimizer._state_keys_for(p):  # "master" too, for bf16/fp16 params
                val = st.get(key)
                dense = torch.zeros(loc.shape, dtype=torch.float32, device=loc.device) \
                    if val is None else optimizer._dense_state(p, val)
                entry[key] = _as_placed(dense, p)
            out["state"][names[p]] = entry
    return out


def load_optimizer_state_dict(optimizer, model: torch.nn.Module, state: Mapping[str, Any]) -> None:
    """Put a state from `optimizer_state_dict` (e.g. after `dcp.load`) back into `optimizer`,
    compacting it with this rank's masks."""
    names = _optimizer_names(optimizer, model)
    groups = state["param_groups"]
    if len(groups) != len(optimizer.param_groups):
        raise ValueError(f"checkpoint has {len(groups)} parameter groups, the optimizer "
                         f"{len(optimizer.param_groups)}")
    for g, saved in zip(optimizer.param_groups, groups):
        g.update({k: v for k, v in saved.items() if k != "params"})
        for p in g["params"]:
            entry = state["state"].get(names[p])
            if entry is None:
                raise ValueError(f"checkpoint has no optimizer state for {names[p]!r}")
            st = {"step": entry["step"].detach().clone().to(torch.float32).cpu()}
            for key in optimizer._state_keys_for(p):
                if key == "master" and key not in entry:
                    continue  # saved without a master: it starts from the parameter
                dense = local_tensor(entry[key]).to(local_tensor(p).device, torch.float32)
                st[key] = optimizer._load_value(p, key, dense.contiguous())
            if float(st["step"]) == 0.0 and all(not bool(v.any()) for k, v in st.items()
                                                  if k != "step"):
                optimizer.state.pop(p, None)  # never stepped: stay lazily initialised
            else:
                optimizer.state[p] = st


def _checkpoint_state(model, optimizer, masks) -> dict[str, Any]:
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    sd: dict[str, Any] = {"model": get_model_state_dict(model)}
    if optimizer is not None:
        sd["optim"] = optimizer_state_dict(optimizer, model)
    if masks is not None:
        sd["masks"] = {n: m.detach().clone() for n, m in masks.items()}
    return sd


def save_checkpoint(path: str, model: torch.nn.Module, optimizer=None, masks=None) -> None:
    """Save model (FSDP2, DDP or plain), optimizer state and masks with
    torch.distributed.checkpoint (every rank calls it; works in one process too)."""
    import torch.distributed.checkpoint as dcp

    dcp.save(_checkpoint_state(model, optimizer, masks), checkpoint_id=str(path))


def load_checkpoint(path: str, model: torch.nn.Module, optimizer=None, masks=None) -> None:
    """Load what `save_checkpoint` wrote into `model` and `optimizer` in place (every rank
    calls it). `masks`, when given, must equal the saved ones: an optimizer state means
    nothing under other masks, so a mismatch raises naming the first differing parameter."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_model_state_dict

    sd = _checkpoint_state(model, optimizer, masks)
    dcp.load(sd, checkpoint_id=str(path))
    if masks is not None:
        for name, saved in sd["masks"].items():
            if not torch.equal(saved.cpu(), masks[name].detach().cpu()):
                raise ValueError(f"checkpoint {path}: the mask of {name!r} differs from the one "
                                 "given; load the masks the checkpoint was trained with")
    set_model_state_dict(model, sd["model"])
    if optimizer is not None:
        load_optimizer_state_dict(optimizer, model, sd["optim"])
