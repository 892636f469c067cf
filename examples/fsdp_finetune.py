"""Dowser on several processes: distributed probing, exact masks over FSDP2 shards, MaskedAdamW
on each shard, and a distributed checkpoint.

    torchrun --nproc-per-node 2 examples/fsdp_finetune.py                  # tiny Llama, CPU/gloo
    torchrun --nproc-per-node 8 examples/fsdp_finetune.py --model PATH --layers 8 --ddp

On GPUs each process takes cuda:LOCAL_RANK and NCCL; on a CPU-only machine, gloo. The default
model is a tiny random Llama built in memory (no download); --model loads a Hugging Face
checkpoint directory (or a GGUF file with --gguf-file).
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist

import dowser
from dowser.distributed import save_checkpoint
from dowser.probe import decoder_layers


def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=120, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, bos_token_id=1,
                      eos_token_id=2, pad_token_id=0, tie_word_embeddings=False)
    return LlamaForCausalLM(cfg)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="HF model directory (default: a tiny random Llama)")
    ap.add_argument("--gguf-file", help="GGUF file inside --model")
    ap.add_argument("--layers", type=int, default=2, help="tune the last L decoder layers")
    ap.add_argument("--rho", type=float, default=0.1)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--ddp", action="store_true", help="DDP instead of FSDP2")
    ap.add_argument("--out", default="dowser-ckpt")
    args = ap.parse_args()

    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    for key, val in (("RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_ADDR", "127.0.0.1"),
                     ("MASTER_PORT", "29511")):
        os.environ.setdefault(key, val)  # run directly: one process
    dist.init_process_group("nccl" if cuda else "gloo")
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    rank, world = dist.get_rank(), dist.get_world_size()

    if args.model:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(args.model, gguf_file=args.gguf_file)
    else:
        model = tiny_llama()
    model.to(device)

    # 1. Probe the plain model (batch b runs on rank b % world, the factors are all-gathered),
    #    build the masks (matrices spread over ranks, packed masks broadcast) and freeze
    #    everything outside the tuned layers: every rank gets the same MaskSet.
    masks = dowser.prepare(model, layers=args.layers, rho=args.rho, n_samples=16, seq_len=32)
    if rank == 0:
        print(masks.summary())
    # 2. Shard (or replicate) the model as usual.
    model.train()
    if args.ddp:
        wrapped = torch.nn.parallel.DistributedDataParallel(model)
    else:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh(device.type, (world,))
        for layer in decoder_layers(model)[1]:
            fully_shard(layer, mesh=mesh)
        wrapped = fully_shard(model, mesh=mesh)
    # 3. MaskedAdamW steps each shard with its rows of the masks; compact state per shard.
    opt = dowser.MaskedAdamW([p for p in model.parameters() if p.requires_grad], masks,
                             model=model, lr=1e-3, weight_decay=0.0)
    vocab = model.config.vocab_size
    gen = torch.Generator().manual_seed(1000 + rank)  # each rank its own (fixed) batch to learn
    ids = torch.randint(3, vocab, (4, 32), generator=gen).to(device)
    for step in range(args.steps):
        loss = wrapped(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if rank == 0:
            print(f"step {step}: loss {loss.item():.4f}")
    # 4. Model, optimizer state and masks in one torch.distributed.checkpoint directory.
    save_checkpoint(args.out, model, opt, masks)
    if rank == 0:
        print(f"checkpoint written to {args.out}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
