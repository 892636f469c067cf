"""Data-free probe prompts, as the authors make them: BOS + 1-5 random token ids, then the
model samples the rest (temperature 0.9, top-p 0.9, repetition penalty 1.05)."""

from __future__ import annotations

import functools
import inspect
from collections.abc import Mapping
from typing import Any

from collections.abc import Callable

import torch
from torch import nn

from dowser.probe.draws import derive_seed

# Authors' generation settings for the data-free prompts.
TEMPERATURE = 0.9
TOP_P = 0.9
REPETITION_PENALTY = 1.05
MAX_SEED_TOKENS = 5


def text_config(model: nn.Module) -> Any:
    cfg = getattr(model, "config", None)
    if cfg is None:
        return None
    getter = getattr(cfg, "get_text_config", None)
    return getter() if callable(getter) else cfg


def special_ids(model: nn.Module, tokenizer: Any) -> tuple[int, int | None, int | None, set[int], int]:
    """(bos, eos, pad, special ids, vocabulary size) from the tokenizer or the model's config."""
    cfg = getattr(model, "config", None)
    tcfg = text_config(model)

    def first(*vals):
        for v in vals:
            if isinstance(v, (list, tuple)):
                v = v[0] if v else None
            if v is not None:
                return int(v)
        return None

    if tcfg is not cfg:
        cfg = None  # a multimodal config: the text config holds the token ids
    tok = tokenizer
    bos = first(getattr(tok, "bos_token_id", None), getattr(tcfg, "bos_token_id", None),
                getattr(cfg, "bos_token_id", None))
    bos = 1 if bos is None else bos  # the authors' default where there is none
    eos = first(getattr(tok, "eos_token_id", None), getattr(tcfg, "eos_token_id", None),
                getattr(cfg, "eos_token_id", None))
    pad = first(getattr(tok, "pad_token_id", None), getattr(tcfg, "pad_token_id", None),
                getattr(cfg, "pad_token_id", None))
    special = {i for i in (bos, eos, pad) if i is not None}
    if tok is not None:
        special.update(int(i) for i in getattr(tok, "all_special_ids", []) or [])
    for holder in (cfg, tcfg):
        for attr in ("image_token_id", "image_token_index", "video_token_id",
                     "vision_start_token_id", "vision_end_token_id", "vision_token_id"):
            v = getattr(holder, attr, None)
            if isinstance(v, int):
                special.add(v)
    if tok is not None:
        vocab = len(tok)
    else:
        vocab = getattr(tcfg, "vocab_size", None) or getattr(cfg, "vocab_size", None)
        if vocab is None:
            head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
            if head is None:
                raise ValueError("cannot tell the vocabulary size: pass a tokenizer, or prompts")
            vocab = head.weight.shape[0]
    return bos, eos, pad, special, int(vocab)


def logits_of(out: Any) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    logits = getattr(out, "logits", None)
    if logits is None and isinstance(out, (tuple, list)):
        logits = out[0]
    if logits is None:
        raise ValueError("the model's output has no logits")
    return logits


def warp_logits(ids: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """The authors' sampling distribution over next tokens (before softmax): repetition
    penalty 1.05 over the ids so far, temperature 0.9, top-p 0.9 — equal, bit for bit, to
    transformers' RepetitionPenaltyLogitsProcessor, TemperatureLogitsWarper and
    TopPLogitsWarper applied in generate()'s order (tests/test_probe.py checks it). Written out
    here so the prompts do not change with transformers' internals."""
    prev = ids.clamp_max(logits.shape[1] - 1)
    score = logits.gather(1, prev)
    score = torch.where(score < 0, score * REPETITION_PENALTY, score / REPETITION_PENALTY)
    logits = logits.scatter(1, prev, score)
    logits = logits / TEMPERATURE
    # top-p with min_tokens_to_keep=1: drop the low tail whose mass is at most 1 - p
    sorted_logits, sorted_idx = torch.sort(logits, descending=False)
    cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    remove = cum <= (1 - TOP_P)
    remove[:, -1] = False
    return logits.masked_fill(remove.scatter(1, sorted_idx, remove), float("-inf"))


@torch.no_grad()
def synthetic_prompts(model: nn.Module, tokenizer: Any = None, *, batch: int, n_rows: int,
                      seq_len: int = 64, seed: int = 0,
                      warp: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = warp_logits,
                      ) -> torch.Tensor:
    """The data-free prompts of probe batch `batch` (n_rows x seq_len token ids), as the authors
    make them: BOS + 1-5 uniformly random non-special ids (specials replaced by BOS), then the
    model samples the rest (temperature 0.9, top-p 0.9, repetition penalty 1.05). All draws come
    from (seed, batch) alone, on a CPU generator, so they do not depend on the device.

    The seed length is drawn once per batch so the batch needs no padding (attention mask all
    ones); a sequence that emits EOS continues with the pad id (EOS where there is none).

    `warp=None` samples from the model's own distribution (temperature 1, no top-p, top-k or
    penalty): the same starts and generator, for dowser.ForgettingMeter.
    """
    bos, eos, pad, special, vocab = special_ids(model, tokenizer)
    gen = torch.Generator().manual_seed(derive_seed(seed, batch, "prompt"))
    n_seed = _seed_length(gen, seq_len)
    rand = torch.randint(0, vocab, (n_rows, n_seed), generator=gen)
    if special:
        is_special = torch.isin(rand, torch.tensor(sorted(special)))
        rand = torch.where(is_special, torch.full_like(rand, bos), rand)
    ids = torch.cat([torch.full((n_rows, 1), bos, dtype=torch.long), rand], dim=1)
    dev = model_device(model)
    fill = pad if pad is not None else eos
    finished = torch.zeros(n_rows, dtype=torch.bool)
    cache_kw = cache_keyword(model)
    past = None
    cur = ids
    while ids.shape[1] < seq_len:
        kwargs = {} if cache_kw is None else {cache_kw: past, "use_cache": True}
        out = model(input_ids=cur.to(dev), **kwargs)
        past = None if cache_kw is None else _output_field(out, cache_kw)
        logits = logits_of(out)[:, -1, :].float().cpu()
        if warp is not None:
            logits = warp(ids, logits)
        nxt = torch.multinomial(logits.softmax(dim=-1), 1, generator=gen).squeeze(1)
        if fill is not None:
            nxt = torch.where(finished, torch.full_like(nxt, fill), nxt)
        if eos is not None:
            finished |= nxt == eos
        ids = torch.cat([ids, nxt[:, None]], dim=1)
        if past is None:
            cur = ids  # no cache: feed the whole sequence again
        else:
            cur = nxt[:, None]
        if fill is not None and bool(finished.all()):
            pad_cols = torch.full((n_rows, seq_len - ids.shape[1]), fill, dtype=torch.long)
            ids = torch.cat([ids, pad_cols], dim=1)
            break
    return ids


def _seed_length(gen: torch.Generator, seq_len: int) -> int:
    # the first draw of a batch's prompt stream: how many random ids follow BOS
    n_seed = int(torch.randint(1, MAX_SEED_TOKENS + 1, (1,), generator=gen))
    return min(n_seed, max(seq_len - 1, 0))


def start_length(seed: int, batch: int, seq_len: int) -> int:
    """Tokens before the sampled part in batch `batch`'s prompts (BOS + the random ids)."""
    return 1 + _seed_length(torch.Generator().manual_seed(derive_seed(seed, batch, "prompt")), seq_len)


def cache_keyword(model: nn.Module) -> str | None:
    """The keyword that hands a KV cache to `model.forward` (and names it in the output):
    `cache` in transformers 5.2x, `past_key_values` before (the old name now warns), None
    when the model takes no cache (then every step feeds the whole sequence)."""
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return "past_key_values"
    for name in ("cache", "past_key_values"):
        if name in params:
            return name
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return _transformers_cache_keyword()
    return None


@functools.lru_cache(maxsize=1)
def _transformers_cache_keyword() -> str:
    # A forward that takes **kwargs only: use the installed transformers' own name.
    try:
        from transformers import LlamaModel
    except ImportError:
        return "past_key_values"
    return "cache" if "cache" in inspect.signature(LlamaModel.forward).parameters \
        else "past_key_values"


def _output_field(out: Any, name: str) -> Any:
    # Key access first: on transformers 5.2x the attribute `past_key_values` is a deprecated
    # alias that warns, and `cache` is the field itself.
    if isinstance(out, Mapping):
        return out.get(name)
    return getattr(out, name, None)


def model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")
