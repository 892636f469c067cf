"""Probe batches: synthetic prompts, user prompts or a dataloader, one `Batch` at a time,
and the Gaussian-noise image inputs of Llava-style image probes."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch
from torch import nn

from dowser.probe.draws import derive_seed
from dowser.probe.prompts import synthetic_prompts


@dataclass
class Batch:
    index: int
    inputs: dict[str, torch.Tensor]
    token_mask: torch.Tensor | None  # (n, T) 1 for real tokens, None when all are real
    n_rows: int


def make_batches(model, tokenizer, *, n_samples, batch_size, seq_len, seed, prompts, dataloader
             ) -> tuple[str, Iterable[Batch], int]:
    """(mode, lazy batches, number of batches)."""
    if prompts is not None and dataloader is not None:
        raise ValueError("pass prompts or dataloader, not both")
    if dataloader is not None:
        def from_loader():
            for b, item in enumerate(dataloader):
                if isinstance(item, torch.Tensor):
                    item = {"input_ids": item}
                if not isinstance(item, Mapping) or "input_ids" not in item:
                    raise ValueError("dataloader batches must be dicts of model inputs with "
                                     "input_ids (or LongTensors of token ids)")
                inputs = {k: v for k, v in item.items() if k != "labels"}
                mask = inputs.get("attention_mask")
                n = int(inputs["input_ids"].shape[0])
                yield Batch(b, inputs, _mask_or_none(mask), n)
        try:
            total = len(dataloader)
        except TypeError:
            total = None
        return "dataloader", from_loader(), total
    if prompts is not None:
        if isinstance(prompts, torch.Tensor):
            if prompts.dim() != 2 or prompts.dtype not in (torch.long, torch.int32, torch.int64):
                raise ValueError(f"prompts as a tensor must be an n x L LongTensor of token ids, "
                                 f"got {tuple(prompts.shape)} {prompts.dtype}")
            ids = prompts.long()
            mask = None
        else:
            if tokenizer is None:
                raise ValueError("prompts as strings need a tokenizer (or pass an n x L "
                                 "LongTensor of token ids)")
            prompts = list(prompts)
            if not prompts or not all(isinstance(p, str) for p in prompts):
                raise ValueError("prompts must be a non-empty list of strings or a LongTensor")
            side = getattr(tokenizer, "padding_side", "right")
            tokenizer.padding_side = "left"  # the last position must be a real token
            try:
                if tokenizer.pad_token is None:
                    tokenizer.pad_token = tokenizer.eos_token
                enc = tokenizer(prompts, return_tensors="pt", padding=True, truncation=True,
                                max_length=seq_len)
            finally:
                tokenizer.padding_side = side
            ids, mask = enc["input_ids"], enc["attention_mask"]
        n = ids.shape[0]
        nb = math.ceil(n / batch_size)

        def from_prompts():
            for b in range(nb):
                sl = slice(b * batch_size, min(n, (b + 1) * batch_size))
                inputs = {"input_ids": ids[sl]}
                m = None
                if mask is not None:
                    inputs["attention_mask"] = mask[sl]
                    m = _mask_or_none(mask[sl])
                yield Batch(b, inputs, m, int(ids[sl].shape[0]))
        return "prompts", from_prompts(), nb

    nb = math.ceil(n_samples / batch_size)

    def synthetic():
        for b in range(nb):
            rows = min(batch_size, n_samples - b * batch_size)
            ids = synthetic_prompts(model, tokenizer, batch=b, n_rows=rows, seq_len=seq_len,
                                    seed=seed)
            yield Batch(b, {"input_ids": ids, "attention_mask": torch.ones_like(ids)}, None, rows)
    return "synthetic", synthetic(), nb


def _mask_or_none(mask: torch.Tensor | None) -> torch.Tensor | None:
    if mask is None or bool(mask.bool().all()):
        return None
    return mask


# --------------------------------------------------------------------------------------------
# Image probes (Llava-style): Gaussian-noise pixels and the image tokens in the prompt
# --------------------------------------------------------------------------------------------

def check_image_probes(model: nn.Module) -> None:
    cfg = getattr(model, "config", None)
    image_token = getattr(cfg, "image_token_id", None)
    if image_token is None:
        image_token = getattr(cfg, "image_token_index", None)
    kind = type(model).__name__
    if getattr(cfg, "vision_config", None) is None or image_token is None \
            or "Llava" not in kind or "Next" in kind:
        raise ValueError(
            f"probing the projector or vision tower data-free needs noise-image probes, which "
            f"dowser makes for Llava-style models only, not {kind}: probe its language layers "
            "(the default), or pass a dataloader of real image inputs")


def image_probe_inputs(model: nn.Module, batch: Batch, seed: int) -> dict[str, torch.Tensor]:
    check_image_probes(model)
    cfg = model.config
    vcfg = cfg.vision_config
    image_token = getattr(cfg, "image_token_id", None)
    if image_token is None:
        image_token = cfg.image_token_index
    size, patch = int(vcfg.image_size), int(vcfg.patch_size)
    n_img = (size // patch) ** 2
    if getattr(cfg, "vision_feature_select_strategy", "default") == "full":
        n_img += 1
    ids = batch.inputs["input_ids"]
    n = ids.shape[0]
    gen = torch.Generator().manual_seed(derive_seed(seed, batch.index, "pixels"))
    pixels = torch.randn((n, int(getattr(vcfg, "num_channels", 3)), size, size), generator=gen)
    img = torch.full((n, n_img), int(image_token), dtype=torch.long)
    new_ids = torch.cat([ids[:, :1], img, ids[:, 1:]], dim=1)
    inputs = {"input_ids": new_ids, "pixel_values": pixels,
              "attention_mask": torch.ones_like(new_ids)}
    return inputs



def select_batches(model, tokenizer, indices, n_samples, batch_size, seq_len, seed):
    nb = math.ceil(n_samples / batch_size)
    for b in indices:
        if not 0 <= b < nb:
            raise ValueError(f"batch index {b} out of range [0, {nb})")
        rows = min(batch_size, n_samples - b * batch_size)
        ids = synthetic_prompts(model, tokenizer, batch=b, n_rows=rows, seq_len=seq_len, seed=seed)
        yield Batch(b, {"input_ids": ids, "attention_mask": torch.ones_like(ids)}, None, rows)
