"""Worker processes of tests/test_distributed.py (2 ranks on gloo): importable by name, as
torch.multiprocessing.spawn requires. Each writes what it computed under `out` for the
parent test to compare with a single process."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

WORLD = 2
SEQ = 12


def tiny():
    """A tiny Llama whose shards are awkward: 51-row gate/up (26 + 25 rows), 51-wide down_proj
    rows (shards do not start on a 32-bit word boundary)."""
    from tests.models import tiny_llama

    return tiny_llama(n_layers=2, hidden=40, intermediate=51, vocab=97, seed=0)


def batch(n: int = 4) -> torch.Tensor:
    return torch.randint(3, 97, (n, SEQ), generator=torch.Generator().manual_seed(7))


def tie_case():
    """Two matrices of small-integer scores (exact in fp32, thousands of ties) and the ks to
    select: none, some, most, all."""
    gen = torch.Generator().manual_seed(5)
    ws = [torch.randint(-3, 4, (37, 45), generator=gen).float(),
          torch.randint(-3, 4, (21, 33), generator=gen).float()]
    psis = [torch.randint(0, 3, (2, w.shape[0]), generator=gen).float() for w in ws]
    As = [torch.randint(0, 3, (2, w.shape[1]), generator=gen).float() for w in ws]
    bws = [torch.tensor([1.0, 3.0])] * 2
    total = sum(w.numel() for w in ws)
    return ws, psis, As, bws, [0, 700, 1801, total - 5, total]


def rows_of(t: torch.Tensor, rank: int) -> tuple[torch.Tensor, int]:
    per = -(-t.shape[0] // WORLD)
    row0 = min(rank * per, t.shape[0])
    return t[row0:row0 + per], row0


def shard(model, mesh):
    from torch.distributed.fsdp import fully_shard

    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def loss_of(model, ids):
    out = model(input_ids=ids, labels=ids)
    return out.loss


def run(rank: int, port: int, name: str, *args) -> None:
    """Run worker `name`, then leave without interpreter finalization: there, torch's gloo
    threads intermittently abort the process ("terminate called without an active
    exception", also at the base commit; see pytorch/pytorch#179291) after the work is done.
    A worker that raises still reports through torch.multiprocessing.spawn."""
    globals()[name](rank, port, *args)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _init(rank: int, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", rank=rank, world_size=WORLD)


def probe_and_masks(rank: int, port: int, out: str) -> None:
    """Distributed probing (synthetic and token-id prompts), then masks on the replicated
    model and on the FSDP2-sharded one, both scopes."""
    import dowser
    from dowser.probe import ProbeStats

    _init(rank, port)
    try:
        out = Path(out)
        model = tiny()
        stats = dowser.probe(model, n_samples=10, batch_size=2, seq_len=SEQ, n_rademacher=3,
                             progress=False)
        stats.save(str(out / f"probe-synthetic-{rank}.safetensors"))
        ids = torch.randint(3, 97, (7, 10), generator=torch.Generator().manual_seed(3))
        dowser.probe(model, prompts=ids, batch_size=2, n_rademacher=2, progress=False).save(
            str(out / f"probe-prompts-{rank}.safetensors"))
        from dowser.distributed import gather_rows_mask, select_masks_sharded

        ws, psis, As, bws, ks = tie_case()
        parts = []
        for w, psi, a, bw in zip(ws, psis, As, bws):
            loc, row0 = rows_of(w, rank)
            parts.append((loc, psi[:, row0:row0 + loc.shape[0]], a, bw))
        ties = {}
        for k in ks:
            bits = select_masks_sharded(parts, [0, 0], [k])
            for i, (b, w) in enumerate(zip(bits, ws)):
                ties[f"{k}-{i}"] = gather_rows_mask(b, w.numel(), w.device)
        torch.save(ties, out / f"ties-{rank}.pt")
        stats = ProbeStats.load(str(out / "stats.safetensors"))  # the parent's single-process run
        for scope in ("matrix", "global"):
            dowser.build_masks(model, stats, rho=0.3, scope=scope).save(
                str(out / f"masks-replicated-{scope}-{rank}.safetensors"))
        from torch.distributed.device_mesh import init_device_mesh

        shard(model, init_device_mesh("cpu", (WORLD,)))
        for scope in ("matrix", "global"):
            dowser.build_masks(model, stats, rho=0.3, scope=scope).save(
                str(out / f"masks-sharded-{scope}-{rank}.safetensors"))
    finally:
        torch.distributed.destroy_process_group()


def _train(model, opt, ids, steps):
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        loss_of(model, ids).backward()
        opt.step()


def train_like_ranks(model, opt, ids, steps):
    """One process doing the distributed arithmetic: each rank's half of the batch backward
    on its own (its own loss mean), then the mean of the two gradients (DDP and FSDP2 average
    over 2 ranks: a sum and a halving, both exact in either order)."""
    params = [p for p in model.parameters() if p.requires_grad]
    for _ in range(steps):
        halves = []
        for rank in range(WORLD):
            opt.zero_grad(set_to_none=True)
            loss_of(model, ids[rank * 2:(rank + 1) * 2]).backward()
            halves.append([p.grad for p in params])
        for p, *gs in zip(params, *halves):
            p.grad = (gs[0] + gs[1]) / WORLD
        opt.step()


def _full_params(model) -> dict[str, torch.Tensor]:
    from dowser.distributed import _is_dtensor

    return {n: (p.full_tensor() if _is_dtensor(p) else p).detach().clone()
            for n, p in model.named_parameters()}


def make_optimizer(model, masks, sgd: bool = False):
    import dowser

    params = [p for p in model.parameters() if p.requires_grad]
    if sgd:
        return dowser.MaskedSGD(params, masks, model=model, lr=0.5, momentum=0.9,
                                weight_decay=0.1)
    return dowser.MaskedAdamW(params, masks, model=model, lr=1e-2, weight_decay=0.1)


def train(rank: int, port: int, out: str, kind: str) -> None:
    """3 steps, checkpoint, 3 more; then a fresh model and optimizer resumed from the
    checkpoint make the same 3 steps. Each rank trains on its half of the batch."""
    import dowser
    from dowser.distributed import load_checkpoint, save_checkpoint
    from dowser.finetune import freeze_outside
    from dowser.masks import MaskSet

    _init(rank, port)
    try:
        out = Path(out)
        masks = MaskSet.load(str(out / "masks.safetensors"))
        ids = batch()[rank * 2:(rank + 1) * 2]
        sgd = kind.endswith("-sgd")

        def build():
            model = tiny().train()
            freeze_outside(model, [n for n, _ in model.named_parameters()
                                   if n.startswith("model.layers.1.")])
            if kind.startswith("fsdp"):
                from torch.distributed.device_mesh import init_device_mesh

                shard(model, init_device_mesh("cpu", (WORLD,)))
                wrapped = model
            else:
                wrapped = torch.nn.parallel.DistributedDataParallel(model)
            return model, wrapped, make_optimizer(model, masks, sgd)

        model, wrapped, opt = build()
        _train(wrapped, opt, ids, 3)
        ckpt = out / f"ckpt-{kind}"
        save_checkpoint(str(ckpt), model, opt, masks)
        _train(wrapped, opt, ids, 3)
        first = _full_params(model)
        model2, wrapped2, opt2 = build()
        load_checkpoint(str(ckpt), model2, opt2, masks)
        _train(wrapped2, opt2, ids, 3)
        second = _full_params(model2)
        torch.save({"first": first, "resumed": second}, out / f"train-{kind}-{rank}.pt")
    finally:
        torch.distributed.destroy_process_group()


def deepspeed_train(rank: int, port: int, out: str, stage: int) -> None:
    """DeepSpeed ZeRO-`stage` on 2 CPU ranks with dowser's gradient-hook mode: frozen entries
    must stay bit-identical, trainable ones move."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(WORLD), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), DS_ACCELERATOR="cpu")
    torch.set_num_threads(1)
    import deepspeed

    import dowser
    from dowser.masks import MaskSet

    masks = MaskSet.load(str(Path(out) / "masks.safetensors"))
    model = tiny().train()
    init = {n: p.detach().clone() for n, p in model.named_parameters()}
    handle = dowser.mask_gradients(model, masks)  # before initialize: ZeRO-3 partitions there
    cfg = {"train_micro_batch_size_per_gpu": 2, "zero_optimization": {"stage": stage},
           "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "weight_decay": 0.0}}}
    engine, opt, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(),
                                             config=cfg)
    handle.check(opt)
    ids = batch()[rank * 2:(rank + 1) * 2]
    for _ in range(3):
        loss = engine(input_ids=ids, labels=ids).loss
        engine.backward(loss)
        engine.step()
    if stage == 3:
        from deepspeed.runtime.zero import GatheredParameters

        with GatheredParameters(list(model.parameters())):
            final = {n: p.detach().clone() for n, p in model.named_parameters()}
    else:
        final = {n: p.detach().clone() for n, p in model.named_parameters()}
    refused = ""
    bad = {"train_micro_batch_size_per_gpu": 2, "zero_optimization": {"stage": stage},
           "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "weight_decay": 0.1}}}
    other = tiny()
    _, opt2, _, _ = deepspeed.initialize(model=other, config=bad,
                                         model_parameters=other.parameters())
    try:
        handle.check(opt2)
    except ValueError as e:
        refused = str(e)
    if rank == 0:
        torch.save({"init": init, "final": final, "refused": refused},
                   Path(out) / f"deepspeed-{stage}.pt")
    torch.distributed.destroy_process_group()
