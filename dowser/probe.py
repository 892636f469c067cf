"""Stage 1 of Model-Dowser on Hugging Face models: which weights does the output depend on?

For every targeted linear layer z = W h, `probe` estimates per probe batch b

    psi_b[i] = mean over Rademacher draws r, sequences and tokens of |d(xi_r^T f)/d z_i|   (L1)
    a_b[j]   = mean over sequences and tokens of |h_j|

where f are the last-position logits, from ONE forward pass per batch and R backward passes
through that retained graph (gradients w.r.t. the layer outputs only: no parameter gradient
is ever computed or kept). The score of W_ij is |W_ij| * sum_b w_b psi_b[i] a_b[j] / sum_b w_b;
it is never materialised here: `dowser.build_masks` hands the factors to `dowser.ops.build_mask`.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
from torch import nn

__all__ = ["ProbeEntry", "ProbeStats", "probe", "find_targets", "synthetic_prompts",
           "rademacher", "prepare", "FORMAT_VERSION"]

FORMAT_VERSION = 1

# Authors' generation settings for the data-free prompts.
TEMPERATURE = 0.9
TOP_P = 0.9
REPETITION_PENALTY = 1.05
MAX_SEED_TOKENS = 5

_PROJECTOR_NAMES = ("multi_modal_projector", "connector", "visual.merger", "mm_projector")
_VISION_NAMES = ("vision_tower", "vision_model", "visual")


# --------------------------------------------------------------------------------------------
# Statistics container
# --------------------------------------------------------------------------------------------

@dataclass
class ProbeEntry:
    """Low-rank factors of one layer's scores: S = |W| * (w Psi)^T A / sum(w), all fp32.

    out_factors: Psi, (B, d_out); in_factors: A, (B, d_in); batch_weights: w, (B,).
    d_out/d_in are those of z = W h, whatever the storage of W (GPT-2's Conv1D stores W^T).
    """

    out_factors: torch.Tensor
    in_factors: torch.Tensor
    batch_weights: torch.Tensor

    def scores(self, weight: torch.Tensor) -> torch.Tensor:
        """Dense d_out x d_in scores for small layers (tests, inspection); never used by masks."""
        w = self.batch_weights.double()
        low = (self.out_factors.double() * w[:, None]).T @ self.in_factors.double() / w.sum()
        return weight.detach().double().abs() * low


class ProbeStats(Mapping):
    """Mapping module name (as in model.named_modules()) -> ProbeEntry, plus `.metadata`."""

    def __init__(self, entries: dict[str, ProbeEntry], metadata: dict[str, Any] | None = None):
        self._entries = dict(entries)
        self.metadata: dict[str, Any] = dict(metadata or {})

    def __getitem__(self, name: str) -> ProbeEntry:
        return self._entries[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"ProbeStats({len(self)} layers, {self.metadata})"

    def save(self, path: str) -> None:
        """Write the factors and metadata to a safetensors file (no pickle)."""
        from safetensors.torch import save_file

        tensors = {}
        for name, e in self._entries.items():
            tensors[f"{name}.out_factors"] = e.out_factors.detach().float().cpu().contiguous()
            tensors[f"{name}.in_factors"] = e.in_factors.detach().float().cpu().contiguous()
            # clone: entries may share one batch-weights tensor, which safetensors refuses
            tensors[f"{name}.batch_weights"] = e.batch_weights.detach().float().cpu().clone()
        meta = dict(self.metadata)
        meta["kind"] = "dowser.ProbeStats"
        meta["format_version"] = FORMAT_VERSION
        meta["layers"] = list(self._entries)
        save_file(tensors, str(path), metadata={"dowser": json.dumps(meta)})

    @classmethod
    def load(cls, path: str, model: nn.Module | None = None) -> "ProbeStats":
        """Read a file written by `save`; with `model`, refuse statistics made for another model
        (the message names the first layer whose name or shape does not fit)."""
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as fh:
            meta = json.loads((fh.metadata() or {}).get("dowser", "{}"))
            if meta.get("kind") != "dowser.ProbeStats":
                raise ValueError(f"{path} is not a dowser ProbeStats file")
            if int(meta.get("format_version", -1)) > FORMAT_VERSION:
                raise ValueError(f"{path} has format version {meta.get('format_version')}, this "
                                 f"dowser reads up to {FORMAT_VERSION}")
            entries = {n: ProbeEntry(fh.get_tensor(f"{n}.out_factors"),
                                     fh.get_tensor(f"{n}.in_factors"),
                                     fh.get_tensor(f"{n}.batch_weights"))
                       for n in meta["layers"]}
        stats = cls(entries, {k: v for k, v in meta.items() if k not in ("kind", "layers")})
        if model is not None:
            modules = dict(model.named_modules())
            for name, e in entries.items():
                mod = modules.get(name)
                if mod is None or _weight_of(mod) is None:
                    raise ValueError(f"statistics file {path} does not fit this model: it has no "
                                     f"linear layer named {name!r}")
                d_out, d_in = layer_dims(mod)
                if (d_out, d_in) != (e.out_factors.shape[1], e.in_factors.shape[1]):
                    raise ValueError(
                        f"statistics file {path} does not fit this model: layer {name!r} is "
                        f"{d_out}x{d_in} here but {e.out_factors.shape[1]}x"
                        f"{e.in_factors.shape[1]} in the file")
        return stats


# --------------------------------------------------------------------------------------------
# Targets
# --------------------------------------------------------------------------------------------

def _is_conv1d(mod: nn.Module) -> bool:
    # transformers' Conv1D (GPT-2): y = x @ W + b with W stored (d_in, d_out).
    return type(mod).__name__ == "Conv1D" and hasattr(mod, "nf")


def _is_linear(mod: nn.Module) -> bool:
    return isinstance(mod, nn.Linear) or _is_conv1d(mod)


def _weight_of(mod: nn.Module) -> torch.Tensor | None:
    w = getattr(mod, "weight", None)
    return w if isinstance(w, torch.Tensor) and w.dim() == 2 and _is_linear(mod) else None


def layer_dims(mod: nn.Module) -> tuple[int, int]:
    """(d_out, d_in) of the map z = W h that `mod` computes."""
    w = mod.weight
    return (w.shape[1], w.shape[0]) if _is_conv1d(mod) else (w.shape[0], w.shape[1])


def _get_path(obj: Any, path: str) -> Any:
    for part in path.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def _layer_list(mod: nn.Module) -> nn.ModuleList | None:
    for attr in ("layers", "h", "blocks"):
        cand = getattr(mod, attr, None)
        if isinstance(cand, nn.ModuleList) and len(cand):
            return cand
    inner = getattr(mod, "model", None)
    if isinstance(inner, nn.Module) and inner is not mod:
        return _layer_list(inner)
    return None


def decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """(qualified name, ModuleList) of the language decoder's layers, found through the model's
    own structure: get_decoder(), language_model, text_model, model, transformer."""
    names = {id(m): n for n, m in model.named_modules()}
    candidates: list[Any] = []
    get_decoder = getattr(model, "get_decoder", None)
    if callable(get_decoder):
        try:
            candidates.append(get_decoder())
        except Exception:  # noqa: BLE001 - some models define it but cannot answer
            pass
    for path in ("language_model", "model.language_model", "text_model", "model.text_model",
                 "model", "transformer"):
        candidates.append(_get_path(model, path))
    for cand in candidates:
        if isinstance(cand, nn.Module) and id(cand) in names:
            layers = _layer_list(cand)
            if layers is not None and id(layers) in names:
                return names[id(layers)], layers
    raise ValueError(
        f"dowser cannot find the decoder layers of {type(model).__name__}: pass targets=[module "
        "names] or targets='regex' to name the linear layers to probe")


def _find_named(model: nn.Module, suffixes: Sequence[str]) -> list[str]:
    """Names of top-most modules whose qualified name ends with one of `suffixes`."""
    found: list[str] = []
    for name, _ in model.named_modules():
        if any(name == s or name.endswith("." + s) for s in suffixes):
            if not any(name.startswith(f + ".") for f in found):
                found.append(name)
    return found


def _linears_under(model: nn.Module, prefixes: Sequence[str], exclude: Sequence[str] = ()) -> list[str]:
    out = []
    for name, mod in model.named_modules():
        if not _is_linear(mod) or _weight_of(mod) is None:
            continue
        if any(name.startswith(p + ".") for p in prefixes) and \
                not any(name.startswith(e + ".") for e in exclude):
            out.append(name)
    return out


def find_targets(model: nn.Module, *, layers: int | None = None,
                 targets: Sequence[str] | str | None = None, include_projector: bool = False,
                 include_lm_head: bool = False, include_vision: bool = False) -> dict[str, str]:
    """Module names to probe, each mapped to its role: "text", "projector", "vision", "lm_head".

    Default: every linear layer of the language decoder's last `layers` layers (all if None).
    `targets` (a list of module names or one regex matched with re.search against names of
    linear modules) replaces the discovery.
    """
    named = dict(model.named_modules())
    if targets is not None:
        if isinstance(targets, str):
            pattern = re.compile(targets)
            chosen = [n for n, m in named.items() if _weight_of(m) is not None and pattern.search(n)]
            if not chosen:
                raise ValueError(f"targets regex {targets!r} matches no linear layer of "
                                 f"{type(model).__name__}")
        else:
            chosen = list(targets)
            for n in chosen:
                if n not in named:
                    raise ValueError(f"targets: {type(model).__name__} has no module named {n!r}")
                if _weight_of(named[n]) is None:
                    raise ValueError(f"targets: module {n!r} is a {type(named[n]).__name__}, not a "
                                     "linear layer (nn.Linear or Conv1D)")
        return {n: _role(model, n) for n in chosen}

    prefix, layer_list = decoder_layers(model)
    n = len(layer_list)
    if layers is not None:
        if isinstance(layers, bool) or not isinstance(layers, int) or not 1 <= layers <= n:
            raise ValueError(f"layers must be an int in [1, {n}] (the number of last decoder "
                             f"layers to probe), got {layers!r}")
    first = n - (layers if layers is not None else n)
    out: dict[str, str] = {}
    for i in range(first, n):
        for name in _linears_under(model, [f"{prefix}.{i}"]):
            out[name] = "text"
    if include_vision:
        proj = _find_named(model, _PROJECTOR_NAMES)
        vis = _find_named(model, _VISION_NAMES)
        if not vis:
            raise ValueError(f"include_vision: {type(model).__name__} has no vision tower "
                             f"(looked for {', '.join(_VISION_NAMES)})")
        for name in _linears_under(model, vis, exclude=proj):
            out[name] = "vision"
    if include_projector:
        proj = _find_named(model, _PROJECTOR_NAMES)
        if not proj:
            raise ValueError(f"include_projector: {type(model).__name__} has no multimodal "
                             f"projector (looked for {', '.join(_PROJECTOR_NAMES)})")
        for name in _linears_under(model, proj):
            out[name] = "projector"
    if include_lm_head:
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        if head is None or _weight_of(head) is None:
            raise ValueError(f"include_lm_head: {type(model).__name__} has no linear lm_head")
        names = {id(m): nm for nm, m in model.named_modules()}
        out[names[id(head)]] = "lm_head"
    return out


def _role(model: nn.Module, name: str) -> str:
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is not None and dict(model.named_modules()).get(name) is head:
        return "lm_head"
    if any(name == p or name.startswith(p + ".") for p in _find_named(model, _PROJECTOR_NAMES)):
        return "projector"
    if any(name.startswith(p + ".") for p in _find_named(model, _VISION_NAMES)):
        return "vision"
    return "text"


# --------------------------------------------------------------------------------------------
# Random draws: everything of batch b derives from (seed, b) alone
# --------------------------------------------------------------------------------------------

def derive_seed(seed: int, batch: int, stream: str) -> int:
    """A 63-bit seed for one random stream of one batch, independent of every other batch."""
    digest = hashlib.sha256(f"dowser:{int(seed)}:{int(batch)}:{stream}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def rademacher(seed: int, batch: int, n_draws: int, n_rows: int, vocab: int) -> torch.Tensor:
    """The Rademacher vectors xi of probe batch `batch`: (n_draws, n_rows, vocab) of +-1 (fp32,
    CPU), drawn from (seed, batch) alone."""
    return torch.stack([_rademacher_one(seed, batch, r, n_rows, vocab) for r in range(n_draws)])


def _rademacher_one(seed: int, batch: int, draw: int, n_rows: int, vocab: int) -> torch.Tensor:
    # One generator per draw, so a draw is made only when its backward runs (no R x vocab
    # buffer) and R can grow without changing the earlier draws.
    gen = torch.Generator().manual_seed(derive_seed(seed, batch, f"xi{draw}"))
    bits = torch.randint(0, 2, (n_rows, vocab), generator=gen, dtype=torch.int8)
    return bits.float() * 2 - 1


def _text_config(model: nn.Module) -> Any:
    cfg = getattr(model, "config", None)
    if cfg is None:
        return None
    getter = getattr(cfg, "get_text_config", None)
    return getter() if callable(getter) else cfg


def _special_ids(model: nn.Module, tokenizer: Any) -> tuple[int, int | None, int | None, set[int], int]:
    """(bos, eos, pad, special ids, vocabulary size) from the tokenizer or the model's config."""
    cfg = getattr(model, "config", None)
    tcfg = _text_config(model)

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


def _logits_of(out: Any) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    logits = getattr(out, "logits", None)
    if logits is None and isinstance(out, (tuple, list)):
        logits = out[0]
    if logits is None:
        raise ValueError("the model's output has no logits")
    return logits


@torch.no_grad()
def synthetic_prompts(model: nn.Module, tokenizer: Any = None, *, batch: int, n_rows: int,
                      seq_len: int = 64, seed: int = 0) -> torch.Tensor:
    """The data-free prompts of probe batch `batch` (n_rows x seq_len token ids), as the authors
    make them: BOS + 1-5 uniformly random non-special ids (specials replaced by BOS), then the
    model samples the rest (temperature 0.9, top-p 0.9, repetition penalty 1.05). All draws come
    from (seed, batch) alone, on a CPU generator, so they do not depend on the device.

    The seed length is drawn once per batch so the batch needs no padding (attention mask all
    ones); a sequence that emits EOS continues with the pad id (EOS where there is none).
    """
    bos, eos, pad, special, vocab = _special_ids(model, tokenizer)
    gen = torch.Generator().manual_seed(derive_seed(seed, batch, "prompt"))
    n_seed = int(torch.randint(1, MAX_SEED_TOKENS + 1, (1,), generator=gen))
    n_seed = min(n_seed, max(seq_len - 1, 0))
    rand = torch.randint(0, vocab, (n_rows, n_seed), generator=gen)
    if special:
        is_special = torch.isin(rand, torch.tensor(sorted(special)))
        rand = torch.where(is_special, torch.full_like(rand, bos), rand)
    ids = torch.cat([torch.full((n_rows, 1), bos, dtype=torch.long), rand], dim=1)
    dev = _model_device(model)
    fill = pad if pad is not None else eos
    finished = torch.zeros(n_rows, dtype=torch.bool)
    past = None
    cur = ids
    while ids.shape[1] < seq_len:
        out = model(input_ids=cur.to(dev), past_key_values=past, use_cache=True)
        past = getattr(out, "past_key_values", None)
        logits = _logits_of(out)[:, -1, :].float().cpu()
        # repetition penalty (as transformers' RepetitionPenaltyLogitsProcessor)
        prev = ids.clamp_max(logits.shape[1] - 1)
        score = logits.gather(1, prev)
        score = torch.where(score < 0, score * REPETITION_PENALTY, score / REPETITION_PENALTY)
        logits = logits.scatter(1, prev, score)
        logits = logits / TEMPERATURE
        # top-p (as transformers' TopPLogitsWarper, min_tokens_to_keep=1)
        sorted_logits, sorted_idx = torch.sort(logits, descending=False)
        cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        remove = cum <= (1 - TOP_P)
        remove[:, -1] = False
        logits = logits.masked_fill(remove.scatter(1, sorted_idx, remove), float("-inf"))
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


def _model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


# --------------------------------------------------------------------------------------------
# Batches
# --------------------------------------------------------------------------------------------

@dataclass
class _Batch:
    index: int
    inputs: dict[str, torch.Tensor]
    token_mask: torch.Tensor | None  # (n, T) 1 for real tokens, None when all are real
    n_rows: int


def _batches(model, tokenizer, *, n_samples, batch_size, seq_len, seed, prompts, dataloader
             ) -> tuple[str, Iterable[_Batch], int]:
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
                yield _Batch(b, inputs, _mask_or_none(mask), n)
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
                yield _Batch(b, inputs, m, int(ids[sl].shape[0]))
        return "prompts", from_prompts(), nb

    nb = math.ceil(n_samples / batch_size)

    def synthetic():
        for b in range(nb):
            rows = min(batch_size, n_samples - b * batch_size)
            ids = synthetic_prompts(model, tokenizer, batch=b, n_rows=rows, seq_len=seq_len,
                                    seed=seed)
            yield _Batch(b, {"input_ids": ids, "attention_mask": torch.ones_like(ids)}, None, rows)
    return "synthetic", synthetic(), nb


def _mask_or_none(mask: torch.Tensor | None) -> torch.Tensor | None:
    if mask is None or bool(mask.bool().all()):
        return None
    return mask


# --------------------------------------------------------------------------------------------
# Image probes (Llava-style): Gaussian-noise pixels and the image tokens in the prompt
# --------------------------------------------------------------------------------------------

def _check_image_probes(model: nn.Module) -> None:
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


def _image_probe_inputs(model: nn.Module, batch: _Batch, seed: int) -> dict[str, torch.Tensor]:
    _check_image_probes(model)
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


# --------------------------------------------------------------------------------------------
# The probe
# --------------------------------------------------------------------------------------------

def _token_mean(x: torch.Tensor, token_mask: torch.Tensor | None, acc_dtype: torch.dtype,
                square: bool = False) -> torch.Tensor:
    """Mean over every dim but the last of |x| (or x^2), over real tokens only when masked."""
    x = x.to(acc_dtype)
    x = x * x if square else x.abs()
    flat = x.reshape(-1, x.shape[-1])
    if token_mask is not None and token_mask.numel() == flat.shape[0]:
        w = token_mask.reshape(-1).to(device=x.device, dtype=acc_dtype)
        return (w @ flat) / w.sum().clamp_min(1)
    return flat.mean(dim=0)


@contextmanager
def _probing_state(model: nn.Module):
    """Eval mode and no parameter requiring grad (the graph starts at the targets' inputs, see
    `_probe_pass`), so no parameter gradient is ever computed and the graph saves no layer
    input for one; mode and requires_grad restored afterwards, whatever happens."""
    was_training = model.training
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        model.eval()
        for p, _ in flags:
            p.requires_grad_(False)
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
        model.train(was_training)


@contextmanager
def _recompute_layers(model: nn.Module, modules: dict[str, nn.Module]):
    """Checkpoint every decoder layer that holds a target (non-reentrant torch.utils.checkpoint)
    while active: the retained graph then keeps only those layers' inputs, and each of the R
    backward passes recomputes one layer's activations at a time. Peak memory drops from
    L layers of activations to one; time grows by about one forward of the probed layers per
    draw."""
    try:
        prefix, layer_list = decoder_layers(model)
    except ValueError:
        yield
        return
    from torch.utils.checkpoint import checkpoint

    patched = []
    for i, layer in enumerate(layer_list):
        if not any(n.startswith(f"{prefix}.{i}.") for n in modules):
            continue
        own = "forward" in layer.__dict__
        orig = layer.forward

        def forward(*args, _orig=orig, **kwargs):
            return checkpoint(_orig, *args, use_reentrant=False, **kwargs)

        layer.forward = forward
        patched.append((layer, own, orig))
    try:
        yield
    finally:
        for layer, own, orig in patched:
            if own:
                layer.forward = orig
            else:
                del layer.forward


def _accepts(model: nn.Module, kwarg: str) -> bool:
    import inspect

    try:
        return kwarg in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


def _probe_pass(model: nn.Module, modules: dict[str, nn.Module], batch: _Batch,
                inputs: dict[str, torch.Tensor], n_rademacher: int, estimator: str, seed: int,
                logits_to_keep: bool, xi_fn: Callable[..., torch.Tensor] | None
                ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """One forward with hooks + R backwards through the retained graph for one batch.
    Returns name -> (psi (d_out,), a (d_in,)) in the accumulation dtype."""
    dev = _model_device(model)
    a_sum: dict[str, torch.Tensor] = {}
    a_cnt: dict[str, int] = {n: 0 for n in modules}
    tmask = batch.token_mask.to(dev) if batch.token_mask is not None else None
    acc_dtype = torch.float64 if next(iter(modules.values())).weight.dtype == torch.float64 \
        else torch.float32
    # accumulators live with each layer (models split across devices keep working)
    psi = {n: torch.zeros(layer_dims(m)[0], dtype=acc_dtype, device=m.weight.device)
           for n, m in modules.items()}
    square = estimator == "l2"
    leaves: list[torch.Tensor] = []   # where the graph starts (see pre_hook)
    outputs: list[torch.Tensor] = []  # targets' outputs, kept only when there is no leaf
    n_reached = [0]
    recording = [True]  # False while backward recomputes checkpointed layers

    def pre_hook(mod, args):
        # Start the graph here: a target whose input does not need grad gets it as a fresh leaf,
        # so everything downstream (all that J_i depends on) is recorded, nothing upstream, and
        # no parameter needs grad. (A recomputation makes the same graph, so it gets a leaf too.)
        if args and isinstance(args[0], torch.Tensor) and args[0].is_floating_point() \
                and not args[0].requires_grad:
            leaf = args[0].detach().requires_grad_(True)
            if recording[0]:
                leaves.append(leaf)
            return (leaf,) + tuple(args[1:])
        return None

    def make_hook(name):
        def grad_hook(g):
            # Reduce dL/dz to its per-feature token mean as soon as autograd produces it, so
            # no layer's full output gradient outlives its own backward step.
            psi[name] += _token_mean(g, tmask, acc_dtype, square=square)

        def hook(mod, args, out):
            if not recording[0]:
                return
            h = args[0] if args else None
            if isinstance(h, torch.Tensor):
                a = _token_mean(h.detach(), tmask, acc_dtype)
                a_sum[name] = a if name not in a_sum else a_sum[name] + a
                a_cnt[name] += 1
            if isinstance(out, torch.Tensor) and out.requires_grad:
                out.register_hook(grad_hook)
                outputs.append(out)
                n_reached[0] += 1
        return hook

    handles = [m.register_forward_hook(make_hook(n)) for n, m in modules.items()]
    handles += [m.register_forward_pre_hook(pre_hook) for m in modules.values()]
    try:
        kwargs = {k: (v.to(dev) if isinstance(v, torch.Tensor) else v) for k, v in inputs.items()}
        if "pixel_values" in kwargs:
            kwargs["pixel_values"] = kwargs["pixel_values"].to(next(model.parameters()).dtype)
        if logits_to_keep:
            kwargs["logits_to_keep"] = 1
        if _accepts(model, "use_cache"):
            kwargs.setdefault("use_cache", False)  # no KV cache to build while probing
        with torch.enable_grad(), _recompute_layers(model, modules):
            out = model(**kwargs)
        recording[0] = False
        f = _logits_of(out)[:, -1, :]
        del out
        if leaves:
            outputs.clear()  # the hooks live on the graph; the outputs themselves may be freed
        grad_inputs = leaves or outputs
        n_rows, vocab = f.shape
        xi = xi_fn(batch.index, n_rademacher, n_rows, vocab) if xi_fn is not None else None
        if n_reached[0] and not f.requires_grad:
            raise RuntimeError("the logits do not depend on the probed layers' outputs")
        for r in range(n_rademacher):
            if not n_reached[0]:
                break
            with torch.enable_grad():
                x = xi[r] if xi is not None else _rademacher_one(seed, batch.index, r, n_rows,
                                                                 vocab)
                loss = (x.to(device=f.device, dtype=f.dtype) * f).sum() / n_rows
                torch.autograd.grad(loss, grad_inputs, retain_graph=r < n_rademacher - 1,
                                    allow_unused=True)
    finally:
        for h in handles:
            h.remove()
    del f, leaves, outputs, grad_inputs
    result = {}
    for n, mod in modules.items():
        p = psi[n] / n_rademacher
        if square:
            p = p.sqrt()
        d_in = layer_dims(mod)[1]
        a = a_sum[n].to(mod.weight.device) / a_cnt[n] if a_cnt[n] else \
            torch.zeros(d_in, dtype=acc_dtype, device=mod.weight.device)
        result[n] = (p, a)
    return result


def probe(model: nn.Module, tokenizer: Any = None, *, layers: int | None = None,
          targets: Sequence[str] | str | None = None, n_samples: int = 64, batch_size: int = 4,
          n_rademacher: int = 8, seq_len: int = 64, estimator: str = "l1", seed: int = 0,
          prompts: Sequence[str] | torch.Tensor | None = None, dataloader: Iterable | None = None,
          include_projector: bool = False, include_lm_head: bool = False,
          include_vision: bool = False, progress: bool = True,
          distributed: bool | None = None) -> ProbeStats:
    """Probe `model` and return the low-rank score factors of every targeted linear layer.

    Args:
        model: a Hugging Face model (or any module whose forward takes input_ids and returns
            logits (batch, tokens, vocab)); fp32, fp16 or bf16; any device.
        tokenizer: optional; without it the vocabulary and BOS/EOS/pad ids come from the config.
        layers: probe the last `layers` decoder layers (default: all).
        targets: explicit module names (list) or a regex over linear-module names.
        n_samples: number of synthetic prompts (ignored with prompts/dataloader, which are used
            whole).
        batch_size: sequences per probe batch (one forward each).
        n_rademacher: R, Rademacher draws (backward passes) per batch.
        seq_len: length of the synthetic prompts (truncation length of string prompts).
        estimator: "l1" (mean |xi^T J_i|, the paper's default) or "l2" (sqrt of mean squares).
        seed: every random draw of batch b (prompt, xi, noise pixels) derives from (seed, b).
        prompts: strings (with a tokenizer) or an n x L LongTensor of token ids: real-data mode.
        dataloader: an iterable of dicts of model inputs: real-data mode.
        include_projector / include_lm_head / include_vision: also probe those (projector and
            vision tower with Gaussian-noise image probes; Llava-style models only).
        progress: show a tqdm bar over batches (on rank 0 only when distributed).
        distributed: split the batches over the ranks of the initialised process group and
            all-gather the factors (default: whenever one with more than one rank exists).
            Batch b goes to rank b % world; with prompts or synthetic probing every rank then
            holds exactly the ProbeStats of one process. With a dataloader each rank probes
            what its own loader yields (shard it, e.g. with a DistributedSampler) and the
            batches are gathered in rank order. Probe the plain model, before wrapping it in
            DDP or fully_shard: ranks run different numbers of forward passes.

    Returns:
        ProbeStats: module name -> ProbeEntry(out_factors (B, d_out), in_factors (B, d_in),
        batch_weights (B,)), fp32 on each layer's device. The projector's input factor and the
        lm_head's output factor are ones (the authors' boundary rule).
    """
    if estimator not in ("l1", "l2"):
        raise ValueError(f"estimator must be 'l1' or 'l2', got {estimator!r}")
    for arg, val in (("n_samples", n_samples), ("batch_size", batch_size),
                     ("n_rademacher", n_rademacher), ("seq_len", seq_len)):
        if isinstance(val, bool) or not isinstance(val, int) or val < 1:
            raise ValueError(f"{arg} must be a positive int, got {val!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an int, got {seed!r}")
    return _probe(model, tokenizer, layers=layers, targets=targets, n_samples=n_samples,
                  batch_size=batch_size, n_rademacher=n_rademacher, seq_len=seq_len,
                  estimator=estimator, seed=seed, prompts=prompts, dataloader=dataloader,
                  include_projector=include_projector, include_lm_head=include_lm_head,
                  include_vision=include_vision, progress=progress, distributed=distributed)


def _probe(model, tokenizer, *, layers, targets, n_samples, batch_size, n_rademacher, seq_len,
           estimator, seed, prompts, dataloader, include_projector, include_lm_head,
           include_vision, progress, xi_fn=None, batch_indices=None,
           distributed=None) -> ProbeStats:
    """`probe` with test hooks: `xi_fn(b, R, n_rows, vocab)` replaces the Rademacher draws and
    `batch_indices` restricts synthetic probing to those batches (order as given)."""
    roles = find_targets(model, layers=layers, targets=targets,
                         include_projector=include_projector, include_lm_head=include_lm_head,
                         include_vision=include_vision)
    named = dict(model.named_modules())
    modules = {n: named[n] for n in roles}
    synthetic = prompts is None and dataloader is None
    # Data-free: text prompts cannot reach the projector or vision tower, so those get their
    # own pass with noise-image probes. Real data: the user's inputs reach whatever they reach.
    image_roles = ("projector", "vision") if synthetic else ()
    text_mods = {n: m for n, m in modules.items() if roles[n] not in image_roles}
    image_mods = {n: m for n, m in modules.items() if roles[n] in image_roles}
    if image_mods:
        _check_image_probes(model)
    # Keep only the last position's logits when nothing needs the others (saves the lm_head
    # matmul and its backward over every token).
    keep_last = "lm_head" not in roles.values() and _accepts(model, "logits_to_keep")

    from tqdm.auto import tqdm

    from dowser import distributed as dd

    if distributed is None:
        distributed = dd.is_active()
    rank, world = dd.rank_and_world() if distributed and batch_indices is None else (0, 1)
    with _probing_state(model):
        # Draw the synthetic prompts in eval mode with nothing requiring grad.
        mode, batches, total = _batches(model, tokenizer, n_samples=n_samples,
                                        batch_size=batch_size, seq_len=seq_len, seed=seed,
                                        prompts=prompts, dataloader=dataloader)
        if batch_indices is not None:
            if mode != "synthetic":
                raise ValueError("batch_indices applies to synthetic probing only")
            batches = _select_batches(model, tokenizer, batch_indices, n_samples, batch_size,
                                      seq_len, seed)
            total = len(batch_indices)
        elif world > 1 and mode == "synthetic":  # generate only this rank's prompts
            mine = list(range(rank, total, world))
            batches = _select_batches(model, tokenizer, mine, n_samples, batch_size, seq_len, seed)
            total = len(mine)
        elif world > 1 and mode == "prompts":
            batches = (b for b in batches if b.index % world == rank)
            total = len(range(rank, total, world))
        psi_rows: dict[str, list[torch.Tensor]] = {n: [] for n in modules}
        a_rows: dict[str, list[torch.Tensor]] = {n: [] for n in modules}
        weights: list[float] = []
        indices: list[int] = []
        for batch in tqdm(batches, total=total, disable=not progress or rank != 0,
                          desc="dowser probe", unit="batch"):
            results = {}
            if text_mods:
                results.update(_probe_pass(model, text_mods, batch, batch.inputs, n_rademacher,
                                           estimator, seed, keep_last, xi_fn))
            if image_mods:
                img_inputs = _image_probe_inputs(model, batch, seed)
                results.update(_probe_pass(model, image_mods, batch, img_inputs, n_rademacher,
                                           estimator, seed, False, xi_fn))
            for n in modules:
                psi_rows[n].append(results[n][0].float())
                a_rows[n].append(results[n][1].float())
            weights.append(float(batch.n_rows))
            indices.append(batch.index)
    if world > 1:
        psi_rows, a_rows, weights = _gather_factors(psi_rows, a_rows, weights, indices,
                                                    order_by_index=mode != "dataloader",
                                                    device=_model_device(model))
    if not weights:
        raise ValueError("no probe batches: prompts/dataloader gave nothing")
    dev = _model_device(model)
    bw = torch.tensor(weights, dtype=torch.float32, device=dev)
    entries = {}
    for n in modules:
        psi = torch.stack(psi_rows[n])
        a = torch.stack(a_rows[n])
        if roles[n] == "projector" and n in _projector_inputs(
                model, [m for m in modules if roles[m] == "projector"]):
            a = torch.ones_like(a)  # boundary rule: the projector's input factor is ones
        if roles[n] == "lm_head":
            psi = torch.ones_like(psi)  # boundary rule: the lm_head's output factor is ones
        entries[n] = ProbeEntry(psi, a, bw.to(psi.device).clone())
    meta = {
        "n_samples": int(sum(weights)), "n_batches": len(weights), "n_rademacher": n_rademacher,
        "estimator": estimator, "seed": seed, "seq_len": seq_len, "batch_size": batch_size,
        "mode": mode, "roles": roles, **model_identity(model),
    }
    return ProbeStats(entries, meta)


def _gather_factors(psi_rows: dict[str, list[torch.Tensor]], a_rows: dict[str, list[torch.Tensor]],
                    weights: list[float], indices: list[int], order_by_index: bool,
                    device: torch.device):
    """Every rank's per-batch factor rows, in batch-index order (or rank order): one
    all-gather of a (local batches x (2 + all factor widths)) fp32 table."""
    from dowser import distributed as dd

    names = list(psi_rows)
    widths = []
    for n in names:
        widths += [psi_rows[n][0].shape[-1] if psi_rows[n] else 0,
                   a_rows[n][0].shape[-1] if a_rows[n] else 0]
    # ranks without a batch learn the widths from the others
    widths = torch.cat(dd.all_gather_rows(torch.tensor([widths]))).amax(0).tolist()
    local = torch.zeros(len(weights), 2 + sum(widths), dtype=torch.float64)
    for r in range(len(weights)):
        cols = [torch.tensor([float(indices[r]), weights[r]], dtype=torch.float64)]
        for n in names:
            cols += [psi_rows[n][r].double().cpu().reshape(-1), a_rows[n][r].double().cpu().reshape(-1)]
        local[r] = torch.cat(cols)
    table = torch.cat(dd.all_gather_rows(local))
    if order_by_index:
        table = table[torch.argsort(table[:, 0], stable=True)]
    devices = {n: (psi_rows[n][0].device if psi_rows[n] else device) for n in names}
    out_psi: dict[str, list[torch.Tensor]] = {}
    out_a: dict[str, list[torch.Tensor]] = {}
    cols = table[:, 2:].split(widths, dim=1)
    for j, n in enumerate(names):
        out_psi[n] = list(cols[2 * j].float().to(devices[n]).unbind(0))
        out_a[n] = list(cols[2 * j + 1].float().to(devices[n]).unbind(0))
    return out_psi, out_a, table[:, 1].tolist()


def _projector_inputs(model: nn.Module, image_names: list[str]) -> set[str]:
    """The projector's first linear layer(s): those whose input is the vision features."""
    out = set()
    for prefix in _find_named(model, _PROJECTOR_NAMES):
        lins = [n for n in image_names if n.startswith(prefix + ".")]
        if lins:
            out.add(lins[0])
    return out


def _select_batches(model, tokenizer, indices, n_samples, batch_size, seq_len, seed):
    nb = math.ceil(n_samples / batch_size)
    for b in indices:
        if not 0 <= b < nb:
            raise ValueError(f"batch index {b} out of range [0, {nb})")
        rows = min(batch_size, n_samples - b * batch_size)
        ids = synthetic_prompts(model, tokenizer, batch=b, n_rows=rows, seq_len=seq_len, seed=seed)
        yield _Batch(b, {"input_ids": ids, "attention_mask": torch.ones_like(ids)}, None, rows)


def model_identity(model: nn.Module) -> dict[str, str]:
    """model_name and config_hash (class + every parameter's name and shape) of a model."""
    cfg = getattr(model, "config", None)
    name = getattr(cfg, "name_or_path", None) or getattr(cfg, "_name_or_path", None) or ""
    h = hashlib.sha256(type(model).__name__.encode())
    for pname, p in model.named_parameters():
        h.update(f"{pname}:{tuple(p.shape)};".encode())
    return {"model_name": name or type(model).__name__, "model_class": type(model).__name__,
            "config_hash": h.hexdigest()[:16]}


def prepare(model: nn.Module, tokenizer: Any = None, rho: float = 0.1, layers: int | None = None,
            *, scope: str = "matrix", **probe_kwargs: Any):
    """Probe `model`, build its masks, and freeze everything outside the tuned layers.

    The tuned layers are the decoder layers that hold a probed target (and any probed module
    outside them: projector linears, lm_head); every parameter in them trains (2-D targets
    through their masks, 1-D norms/biases densely); every other parameter gets
    requires_grad=False. Returns the MaskSet (keys: parameter names), ready for
    dowser.MaskedAdamW(params, masks, model=model).
    """
    from dowser.masks import build_masks

    stats = probe(model, tokenizer, layers=layers, **probe_kwargs)
    masks = build_masks(model, stats, rho=rho, scope=scope)
    units = set()
    try:
        prefix = decoder_layers(model)[0]
    except ValueError:
        prefix = None
    for name in stats:
        unit = name
        if prefix is not None and name.startswith(prefix + "."):
            idx = name[len(prefix) + 1:].split(".")[0]
            unit = f"{prefix}.{idx}"
        units.add(unit)
    named = dict(model.named_modules())
    tuned = {id(p) for u in units for p in named[u].parameters()}
    for p in model.parameters():
        p.requires_grad_(id(p) in tuned)
    return masks
