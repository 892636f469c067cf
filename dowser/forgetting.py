"""A data-free forgetting meter: how far has a fine-tuned model drifted from its base?

    meter = dowser.ForgettingMeter(base_model, tokenizer, n_samples=32, seed=0)   # once
    r = meter.measure(tuned_model)         # any time: during training, after, on a merged PEFT
    print(r.kl, r.kl_se, r.ce, r.agreement)

The base model writes N texts itself, from the probe's prompt starts (BOS + 1-5 random ids,
the same seeded streams as `dowser.probe`), continued by ancestral sampling at temperature 1
with no top-p, top-k or repetition penalty. For x drawn from p_base,

    E_x[log p_base(x) - log p_tuned(x)] = KL(p_base || p_tuned)

so the mean over the sampled tokens of the log-probability the tuned model loses is an
unbiased estimate of the KL per token (the probe's tempered sampler would bias it: it draws
from another distribution). Only the token ids and the base's log-probability of each sampled
token are kept (O(N x tokens), no vocabulary-sized tensor), so measuring a model is one
teacher-forced forward pass over N x tokens ids.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from dowser.probe.prompts import logits_of, model_device, special_ids, start_length, synthetic_prompts, text_config


@dataclass(frozen=True)
class ForgettingResult:
    """What `ForgettingMeter.measure` finds.

    kl: KL(p_base || p_model) per sampled token (nats), the estimator's mean.
    kl_se: its standard error (over the N samples, ratio estimator).
    ce: the model's cross-entropy on the base's samples (nats/token); the base's own is
        `base_ce`, and ce - base_ce = kl.
    agreement: fraction of sampled positions where the model's top-1 token is the base's.
    n_tokens, n_samples: how many scored tokens and samples; seconds: wall time of the measure.
    """

    kl: float
    kl_se: float
    ce: float
    base_ce: float
    agreement: float
    n_tokens: int
    n_samples: int
    seconds: float

    def as_dict(self, prefix: str = "") -> dict[str, float]:
        return {prefix + k: v for k, v in asdict(self).items()}

    def __str__(self) -> str:
        return (f"KL {self.kl:.4f} ± {self.kl_se:.4f} nats/token, CE {self.ce:.4f} (base {self.base_ce:.4f}), "
                f"top-1 agreement {self.agreement:.4f} ({self.n_samples} samples, {self.n_tokens} tokens, "
                f"{self.seconds:.2f} s)")


def vocab_size(model: nn.Module) -> int | None:
    """The size of the model's output layer (what its logits index), without a forward pass."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    weight = getattr(head, "weight", None)
    if isinstance(weight, torch.Tensor):
        return int(weight.shape[0])
    cfg = text_config(model)
    v = getattr(cfg, "vocab_size", None)
    return None if v is None else int(v)


class ForgettingMeter:
    """Self-written samples of the base model and their base log-probabilities.

    Args:
        base_model: the model before fine-tuning (text or vision-language; text-only samples).
        tokenizer: optional; gives BOS/EOS/special ids and the vocabulary, as for dowser.probe.
        n_samples: how many texts the base writes (the standard error falls as 1/sqrt(N)).
        max_tokens: length of each text in tokens, the prompt start included.
        seed: seeds the prompt starts and the sampling (the probe's streams for that seed).
        batch_size: texts per forward pass, when writing and when measuring.
    """

    def __init__(self, base_model: nn.Module, tokenizer: Any = None, *, n_samples: int = 32,
                 max_tokens: int = 64, seed: int = 0, batch_size: int = 8) -> None:
        # max_tokens >= 8: BOS + up to 5 random ids leave at least 2 sampled tokens
        for name, v, lo in (("n_samples", n_samples, 2), ("max_tokens", max_tokens, 8), ("batch_size", batch_size, 1)):
            if not isinstance(v, int) or isinstance(v, bool) or v < lo:
                raise ValueError(f"ForgettingMeter: {name} must be an integer >= {lo}, got {v!r}")
        self.vocab = special_ids(base_model, tokenizer)[4]
        head = vocab_size(base_model)
        if head is not None and head < self.vocab:
            raise ValueError(f"ForgettingMeter: the tokenizer has {self.vocab} tokens but the model's "
                             f"output layer {head}: they do not belong together")
        self.vocab = head if head is not None else self.vocab
        self.n_samples, self.max_tokens, self.seed, self.batch_size = n_samples, max_tokens, seed, batch_size
        _, eos, _, _, _ = special_ids(base_model, tokenizer)
        t0 = time.perf_counter()
        with _eval_no_grad(base_model):
            chunks = []
            for b in range(math.ceil(n_samples / batch_size)):
                rows = min(batch_size, n_samples - b * batch_size)
                ids = synthetic_prompts(base_model, tokenizer, batch=b, n_rows=rows, seq_len=max_tokens,
                                        seed=seed, warp=None)
                chunks.append((ids, start_length(seed, b, max_tokens)))
            ids = torch.cat([c[0] for c in chunks])
            # scored[i, t]: token t+1 of text i was drawn from the base (not the random start,
            # not the filler after EOS); targets are ids[:, 1:]
            scored = torch.zeros(ids.shape[0], ids.shape[1] - 1, dtype=torch.bool)
            row = 0
            for c, start in chunks:
                scored[row:row + c.shape[0], start - 1:] = True
                row += c.shape[0]
            if eos is not None:
                is_eos = (ids[:, 1:] == eos) & scored
                after = (is_eos.cumsum(1) - is_eos.int()) > 0  # strictly after the first EOS
                scored &= ~after
            self.ids = ids.to(torch.int32 if self.vocab < 2**31 else torch.int64)
            self.scored = scored
            if int(scored.sum()) == 0:
                raise ValueError("ForgettingMeter: the base model wrote no token to score")
            logp, top1 = self._forward(base_model)
            self.base_logp = logp  # fp32, N x (tokens - 1): log p_base of each sampled token
            self.base_top1 = top1
        self.build_seconds = time.perf_counter() - t0

    @property
    def nbytes(self) -> int:
        """Bytes of stored state: ids, mask, base log-probs and top-1 ids (O(N x tokens))."""
        return sum(t.numel() * t.element_size() for t in (self.ids, self.scored, self.base_logp, self.base_top1))

    def _forward(self, model: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        """log p_model(sampled token) and the model's top-1 id at every position (N x (T-1))."""
        dev = model_device(model)
        logps, tops = [], []
        for i in range(0, self.ids.shape[0], self.batch_size):
            ids = self.ids[i:i + self.batch_size].long()
            out = model(input_ids=ids.to(dev), attention_mask=torch.ones_like(ids, device=dev),
                        use_cache=False)
            logits = logits_of(out)[:, :-1, :]
            if logits.shape[-1] != self.vocab:
                raise ValueError(f"ForgettingMeter: the model predicts {logits.shape[-1]} tokens, "
                                 f"the base {self.vocab}: not a fine-tune of the same model")
            # log-softmax in fp32 whatever the model's dtype: bf16 log-probs would swamp small KLs
            logp = torch.log_softmax(logits.float(), dim=-1)
            target = ids[:, 1:].to(dev)
            logps.append(logp.gather(-1, target[..., None]).squeeze(-1).cpu())
            tops.append(logits.argmax(-1).to(torch.int32).cpu())
            del out, logits, logp
        return torch.cat(logps), torch.cat(tops)

    def measure(self, model: nn.Module) -> ForgettingResult:
        """KL(base || model) per token on the stored samples, with its standard error, the
        model's CE on them and its top-1 agreement with the base. Runs in the model's dtype,
        under no_grad, and leaves every module's train/eval mode as it found it."""
        v = vocab_size(model)
        if v is not None and v != self.vocab:
            raise ValueError(f"ForgettingMeter: the model has a vocabulary of {v}, the base {self.vocab}: "
                             "not a fine-tune of the same model")
        t0 = time.perf_counter()
        with _eval_no_grad(model):
            logp, top1 = self._forward(model)
        m = self.scored
        diff = torch.where(m, self.base_logp.double() - logp.double(), 0.0)
        n_i = m.sum(1).double()
        s_i = diff.sum(1)
        n = float(n_i.sum())
        kl = float(s_i.sum()) / n
        # ratio estimator sum(s_i)/sum(n_i): delta-method standard error over the N samples
        N = s_i.numel()
        resid = s_i - kl * n_i
        se = math.sqrt(float((resid ** 2).sum()) / (N * (N - 1))) / (n / N)
        ce = float(torch.where(m, -logp.double(), 0.0).sum()) / n
        base_ce = float(torch.where(m, -self.base_logp.double(), 0.0).sum()) / n
        agree = float(((top1 == self.base_top1) & m).sum()) / n
        return ForgettingResult(kl=kl, kl_se=se, ce=ce, base_ce=base_ce, agreement=agree,
                                n_tokens=int(n), n_samples=N, seconds=time.perf_counter() - t0)


class _eval_no_grad:
    """eval() + no_grad for the duration; every module's own training flag restored after."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def __enter__(self) -> None:
        self.modes = [(m, m.training) for m in self.model.modules()]
        self.grad = torch.no_grad()
        self.grad.__enter__()
        self.model.eval()

    def __exit__(self, *exc: Any) -> None:
        self.grad.__exit__(*exc)
        for m, mode in self.modes:
            m.training = mode
