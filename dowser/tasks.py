"""Built-in upstream/downstream tasks for the demo and the forgetting study (no download).

- Upstream: held-out English prose that nobody here wrote — Python's own documentation as
  shipped in the standard library (`pydoc_data.topics`) — measured as next-token top-1 accuracy.
- Downstream: a digit cipher. Each digit maps to a fixed letter ("cipher: 3 9 1 =" -> " v b q").
  A pretrained model cannot guess the mapping zero-shot, yet learns it in a few hundred steps;
  measured as teacher-forced token accuracy and exact match over the answer tokens (an example
  is an exact match iff greedy decoding would reproduce the whole answer).
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from typing import Any, Sequence

import torch

CIPHER = dict(zip("0123456789", "kqzvehrmwb"))


def _encode(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


class CharTokenizer:
    """Byte-level tokenizer for the tiny built-in model: id = byte + 3; 0 pad, 1 bos, 2 eos."""

    pad_token_id, bos_token_id, eos_token_id = 0, 1, 2
    vocab_size = 259

    def __call__(self, text: str, add_special_tokens: bool = False) -> dict[str, list[int]]:
        ids = [b + 3 for b in text.encode("utf-8")]
        return {"input_ids": ([self.bos_token_id] + ids) if add_special_tokens else ids}

    def decode(self, ids: Sequence[int]) -> str:
        return bytes(i - 3 for i in ids if i >= 3).decode("utf-8", errors="replace")


def upstream_texts(split: str = "eval") -> list[str]:
    """Paragraphs of prose from the stdlib's pydoc topics: 'eval' (odd topics) or 'probe' (even),
    so real-data probing never sees the text that upstream accuracy is measured on."""
    if split not in ("eval", "probe"):
        raise ValueError(f"split must be 'eval' or 'probe', got {split!r}")
    probe = _paragraphs(0)
    if split == "probe":
        return probe
    seen = set(probe)  # some boilerplate paragraphs recur across topics
    return [p for p in _paragraphs(1) if p not in seen]


def _paragraphs(parity: int) -> list[str]:
    from pydoc_data.topics import topics

    out: list[str] = []
    for i, key in enumerate(sorted(topics)):
        if i % 2 != parity:
            continue
        for para in re.split(r"\n\s*\n", topics[key]):
            lines = [ln.strip() for ln in para.splitlines()]
            # Prose only: skip code blocks, grammar rules and headings.
            if not lines or para.startswith("   ") or any(set(ln) <= set("*=-~^") for ln in lines):
                continue
            text = " ".join(lines)
            if len(text) >= 200 and "::=" not in text and text not in out:
                out.append(text)
    return out


def upstream_chunks(tokenizer: Any, seq_len: int = 128, n_chunks: int = 32, split: str = "eval",
                    bos_id: int | None = None) -> torch.Tensor:
    """n_chunks x seq_len token ids cut from the concatenated upstream paragraphs."""
    ids: list[int] = []
    for text in upstream_texts(split):
        ids += _encode(tokenizer, text + "\n")
        if len(ids) >= n_chunks * seq_len:
            break
    width = seq_len - (bos_id is not None)
    if len(ids) < n_chunks * width:
        raise ValueError(f"upstream text too short for {n_chunks} x {seq_len} tokens")
    chunks = torch.tensor(ids[: n_chunks * width]).view(n_chunks, width)
    if bos_id is not None:
        chunks = torch.cat([torch.full((n_chunks, 1), bos_id), chunks], dim=1)
    return chunks


@torch.no_grad()
def upstream_metrics(model: torch.nn.Module, chunks: torch.Tensor, batch_size: int = 8,
                     progress: bool = False) -> dict[str, float]:
    """Top-1 next-token accuracy ("acc") and mean cross-entropy in nats ("ce") over every
    position of every chunk: the two upstream (forgetting) measures."""
    from tqdm.auto import tqdm

    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    hits = total = 0
    nll = 0.0
    for batch in tqdm(chunks.split(batch_size), desc="eval upstream", disable=not progress, leave=False):
        batch = batch.to(device)
        logits = model(input_ids=batch).logits[:, :-1].float()
        target = batch[:, 1:]
        hits += int((logits.argmax(-1) == target).sum())
        nll += float(torch.nn.functional.cross_entropy(logits.flatten(0, 1), target.flatten(),
                                                       reduction="sum"))
        total += target.numel()
    model.train(was_training)
    return {"acc": hits / total, "ce": nll / total}


def next_token_accuracy(model: torch.nn.Module, chunks: torch.Tensor, batch_size: int = 8) -> float:
    """Top-1 next-token accuracy over every position of every chunk."""
    return upstream_metrics(model, chunks, batch_size)["acc"]


@dataclass
class Example:
    prompt: list[int]
    answer: list[int]


def cipher_examples(tokenizer: Any, n: int, seed: int, min_digits: int = 3, max_digits: int = 6,
                    bos_id: int | None = None, exclude: Sequence[Example] = ()) -> list[Example]:
    """`n` distinct digit-cipher examples, reproducible from `seed`, none of whose prompts is
    in `exclude` (pass the test set to draw a disjoint training or validation set)."""
    rng = random.Random(seed)
    seen = {tuple(e.prompt) for e in exclude}
    out: list[Example] = []
    for _ in range(100 * n):
        if len(out) == n:
            break
        digits = [rng.choice("0123456789") for _ in range(rng.randint(min_digits, max_digits))]
        prompt = ([bos_id] if bos_id is not None else []) + _encode(tokenizer, "cipher: " + " ".join(digits) + " =")
        if tuple(prompt) in seen:
            continue
        seen.add(tuple(prompt))
        answer = _encode(tokenizer, " " + " ".join(CIPHER[d] for d in digits) + "\n")
        out.append(Example(prompt, answer))
    if len(out) < n:
        raise ValueError(f"only {len(out)} distinct examples with {min_digits}-{max_digits} digits")
    return out


def collate(examples: Sequence[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded input_ids / attention_mask / labels (loss on answer tokens only)."""
    width = max(len(e.prompt) + len(e.answer) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), -100, dtype=torch.long)
    attn = torch.zeros((len(examples), width), dtype=torch.long)
    for i, e in enumerate(examples):
        seq = e.prompt + e.answer
        ids[i, : len(seq)] = torch.tensor(seq)
        attn[i, : len(seq)] = 1
        labels[i, len(e.prompt): len(seq)] = torch.tensor(e.answer)
    return {"input_ids": ids, "attention_mask": attn, "labels": labels}


def answer_logits(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Logits at the answer positions only: (logits (N, vocab), targets (N,), row of each (N,)).

    The output layer is applied to the N labelled positions rather than to every token (on a
    49k-token vocabulary it is a fifth of a small model's compute); models without
    get_decoder()/get_output_embeddings() fall back to the full forward."""
    target = batch["labels"][:, 1:]
    valid = target != -100
    rows = torch.arange(target.shape[0], device=target.device)[:, None].expand_as(target)[valid]
    try:
        decoder, head = model.get_decoder(), model.get_output_embeddings()
    except (AttributeError, ValueError, NotImplementedError):
        decoder = head = None
    if decoder is not None and head is not None and decoder is not model:
        hidden = decoder(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        logits = head(hidden[:, :-1][valid])
    else:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1][valid]
    return logits, target[valid], rows


@torch.no_grad()
def task_accuracy(model: torch.nn.Module, examples: Sequence[Example], pad_id: int,
                  batch_size: int = 16, progress: bool = False) -> dict[str, float]:
    """Teacher-forced token accuracy and exact match on the answer tokens."""
    from tqdm.auto import tqdm

    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    tok_hits = tok_total = exact = 0
    starts = range(0, len(examples), batch_size)
    for start in tqdm(starts, desc="eval downstream", disable=not progress, leave=False):
        batch = {k: v.to(device) for k, v in collate(examples[start:start + batch_size], pad_id).items()}
        logits, target, rows = answer_logits(model, batch)
        correct = logits.argmax(-1) == target
        tok_hits += int(correct.sum())
        tok_total += int(target.numel())
        wrong = torch.zeros(batch["input_ids"].shape[0], dtype=torch.long, device=device)
        wrong.index_add_(0, rows, (~correct).long())
        exact += int((wrong == 0).sum())
    model.train(was_training)
    return {"token_acc": tok_hits / tok_total, "exact_match": exact / len(examples)}


# --- several ciphers, one per task, for the continual-learning bench (bench/continual.py) ---

CIPHERS = {
    "alpha": CIPHER,
    "beta": dict(zip("0123456789", "pxjgnsdtly")),
    "gamma": dict(zip("0123456789", "ucfaoiwbkr")),
}


def named_cipher_examples(tokenizer: Any, task: str, n: int, seed: int, min_digits: int = 3,
                          max_digits: int = 6, bos_id: int | None = None) -> list[Example]:
    """`n` examples of the cipher `task` (a key of CIPHERS), reproducible from `seed`.

    The prompt names the task ("beta: 3 9 1 =" -> " g l x"), so one model can hold all of them:
    learning one cipher after another overwrites the earlier ones only through forgetting."""
    if task not in CIPHERS:
        raise ValueError(f"task must be one of {sorted(CIPHERS)}, got {task!r}")
    table = CIPHERS[task]
    rng = random.Random(f"{task}:{seed}")
    out = []
    for _ in range(n):
        digits = [rng.choice("0123456789") for _ in range(rng.randint(min_digits, max_digits))]
        prompt = ([bos_id] if bos_id is not None else []) + \
            _encode(tokenizer, f"{task}: " + " ".join(digits) + " =")
        answer = _encode(tokenizer, " " + " ".join(table[d] for d in digits) + "\n")
        out.append(Example(prompt, answer))
    return out


# --- a natural-language task: facts about fictional people (bench/forgetting.py --task facts) ---

_FIRST = ("Alda", "Borin", "Cassia", "Dorell", "Emrys", "Faline", "Gideon", "Hesper", "Ilvar",
          "Jorunn", "Kestrel", "Lioba", "Maelis", "Nerio", "Orla", "Perrin", "Quenby", "Rhodri",
          "Sabeth", "Tamsin", "Ulric", "Verity", "Wystan", "Xanthe", "Yorick", "Zelda")
_LAST = ("Ashgrove", "Brackwell", "Corrigan", "Dunmore", "Elsworth", "Fairhollow", "Garrow",
         "Hartigan", "Ingleby", "Jessop", "Kilbride", "Lockhart", "Merriwether", "Northcote",
         "Oakhurst", "Pendragon", "Quillfeather", "Ravenscroft", "Sallow", "Thistlewood")
FACT_VALUES = {
    "year": tuple(str(y) for y in range(1931, 1999)),
    "city": ("Lisbon", "Oslo", "Nairobi", "Lima", "Hanoi", "Tunis", "Quito", "Perth", "Riga",
             "Dakar", "Porto", "Leeds", "Bergen", "Austin", "Osaka", "Turin", "Ghent", "Cork"),
    "employer": ("Brightwater Mills", "Copperline Freight", "Duskfield Labs", "Emberstone Bank",
                 "Foxglove Press", "Granite Harbor Co", "Hollowreed Farms", "Ironbark Tools",
                 "Juniper Rail", "Kingfisher Optics", "Larkspur Foods", "Moonridge Energy"),
}
# Templates per attribute and split. A person's facts are taught by STATEMENTS (train) and by
# questions in the TRAIN wording; validation and test ask with wordings the training never
# uses, so a right answer there means the fact was learned, not a sentence memorised.
# {n} is the name; the answer (" <value>\n") follows the prompt.
FACT_TEMPLATES = {
    "statement": {
        "year": ("{n} was born in", "The year of {n}'s birth was", "{n} came into the world in"),
        "city": ("{n} lives in the city of", "The home town of {n} today is",
                 "{n} has an apartment in"),
        "employer": ("{n} works for", "The employer of {n} is", "Every weekday {n} goes to work at"),
    },
    "train": {
        "year": ("Q: When was {n} born?\nA:", "Q: What is {n}'s birth year?\nA:"),
        "city": ("Q: Where does {n} live?\nA:", "Q: Which city is {n}'s home?\nA:"),
        "employer": ("Q: Who employs {n}?\nA:", "Q: Which company does {n} work for?\nA:"),
    },
    "val": {
        "year": ("Q: Tell me the year {n} was born.\nA:",),
        "city": ("Q: Name the city {n} lives in.\nA:",),
        "employer": ("Q: Name {n}'s employer.\nA:",),
    },
    "test": {
        "year": ("Q: In which year was {n} born?\nA:", "Q: What was the birth year of {n}?\nA:"),
        "city": ("Q: In what city does {n} reside?\nA:", "Q: {n} resides in which city?\nA:"),
        "employer": ("Q: Which firm is {n} employed by?\nA:", "Q: {n} is on the payroll of which company?\nA:"),
    },
}


@dataclass(frozen=True)
class FactPair:
    """One prompt/answer text pair of the facts task (`template` names its wording)."""
    prompt: str
    answer: str
    person: str
    attribute: str
    template: str


@dataclass(frozen=True)
class FactWorld:
    """The fictional people of one seed and the task's splits as text pairs."""
    people: tuple[tuple[str, dict[str, str]], ...]
    train: tuple[FactPair, ...]
    val: tuple[FactPair, ...]
    test: tuple[FactPair, ...]


def make_facts(seed: int = 0, n_people: int = 24) -> FactWorld:
    """`n_people` fictional people (distinct names; birth year, city, employer drawn with
    `seed`) and their fact pairs: train = every statement template and every train-question
    template of every fact; val and test = one pair per fact, each in a held-out wording drawn
    with `seed` from that split's templates (the three template sets are disjoint)."""
    names = [f"{a} {b}" for a in _FIRST for b in _LAST]
    if not 1 <= n_people <= len(names):
        raise ValueError(f"n_people must be in [1, {len(names)}], got {n_people}")
    rng = random.Random(f"facts:{seed}")
    people = tuple((n, {a: rng.choice(v) for a, v in FACT_VALUES.items()})
                   for n in rng.sample(names, n_people))

    def pairs(split: str, every: bool) -> tuple[FactPair, ...]:
        out = []
        for name, facts in people:
            for attr, value in facts.items():
                temps = FACT_TEMPLATES[split][attr]
                for i, t in (enumerate(temps) if every else [rng.choice(list(enumerate(temps)))]):
                    out.append(FactPair(t.format(n=name), f" {value}\n", name, attr, f"{split}/{attr}/{i}"))
        return tuple(out)

    train = pairs("statement", True) + pairs("train", True)
    return FactWorld(people, train, pairs("val", False), pairs("test", False))


def fact_examples(tokenizer: Any, pairs: Sequence[FactPair], bos_id: int | None = None) -> list[Example]:
    """Token ids of fact pairs (loss and accuracy on the answer tokens, as for the cipher)."""
    head = [bos_id] if bos_id is not None else []
    return [Example(head + _encode(tokenizer, p.prompt), _encode(tokenizer, p.answer)) for p in pairs]
