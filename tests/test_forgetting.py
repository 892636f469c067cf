"""dowser.ForgettingMeter: the data-free KL estimator, its callback and its CLI."""

import copy
import math
import warnings

import pytest
import torch

import dowser
from dowser.forgetting import ForgettingMeter
from tests.models import tiny_llama, tiny_llava, tiny_qwen2_vl


def _perturbed(model, scale, seed=1):
    """A copy of `model` with Gaussian noise of std `scale` added to every 2-D weight."""
    gen = torch.Generator().manual_seed(seed)
    out = copy.deepcopy(model)
    with torch.no_grad():
        for p in out.parameters():
            if p.dim() == 2:
                p.add_(torch.randn(p.shape, generator=gen) * scale)
    return out


def _peaked(seed=0):
    """A tiny Llama whose next-token distributions are far from uniform (lm_head scaled up), so
    that training moves the KL well beyond the estimator's noise at a few samples."""
    model = tiny_llama(seed=seed)
    with torch.no_grad():
        model.lm_head.weight.mul_(20)
    return model


def _exact_kl_on_contexts(meter, base, tuned):
    """sum over scored positions of KL(p_base(.|ctx) || p_tuned(.|ctx)), full vocabulary,
    divided by the number of scored positions: the estimator's expectation given the contexts."""
    with torch.no_grad():
        ids = meter.ids.long()
        lb = torch.log_softmax(base(input_ids=ids).logits[:, :-1].double(), -1)
        lt = torch.log_softmax(tuned(input_ids=ids).logits[:, :-1].double(), -1)
        kl = (lb.exp() * (lb - lt)).sum(-1)
        return float(kl[meter.scored].sum() / meter.scored.sum())


def test_estimator_matches_exact_kl_within_its_standard_error():
    base = tiny_llama(vocab=16, seed=0)
    tuned = _perturbed(base, 0.1)
    meter = ForgettingMeter(base, n_samples=512, max_tokens=16, seed=3, batch_size=128)
    r = meter.measure(tuned)
    exact = _exact_kl_on_contexts(meter, base, tuned)
    assert exact > 0.01  # a drift the test can see
    assert r.kl_se < 0.1 * exact
    assert abs(r.kl - exact) < 3 * r.kl_se, (r.kl, exact, r.kl_se)
    assert math.isclose(r.ce - r.base_ce, r.kl, rel_tol=1e-9, abs_tol=1e-12)
    # the samples come from p_base itself: the base's CE on them estimates its exact entropy on
    # the same contexts (a tempered or truncated sampler gives a lower CE: this fails)
    with torch.no_grad():
        lb = torch.log_softmax(base(input_ids=meter.ids.long()).logits[:, :-1].double(), -1)
    ent = -(lb.exp() * lb).sum(-1)
    m = meter.scored
    s_i = torch.where(m, -meter.base_logp.double(), 0.0).sum(1)
    e_i = torch.where(m, ent, 0.0).sum(1)
    n_i = m.sum(1).double()
    d_i = s_i - e_i  # per-sample (sampled CE - exact entropy), ratio estimator over samples
    se = float(((d_i - d_i.sum() / n_i.sum() * n_i) ** 2).sum().sqrt() / n_i.sum())
    assert abs(float(d_i.sum() / n_i.sum())) < 3 * se, (float(d_i.sum() / n_i.sum()), se)


def test_zero_for_an_unchanged_model_and_top1_agrees():
    base = tiny_llama(seed=0)
    meter = ForgettingMeter(base, n_samples=8, max_tokens=20, seed=0, batch_size=4)
    r = meter.measure(copy.deepcopy(base))
    assert r.kl == 0.0 and r.kl_se == 0.0 and r.agreement == 1.0 and r.ce == r.base_ce
    assert r.n_samples == 8 and 0 < r.n_tokens <= 8 * 19


def test_zero_for_a_dowser_run_with_rho_zero():
    model = tiny_llama(n_layers=2, seed=0)
    meter = ForgettingMeter(model, n_samples=8, max_tokens=16, seed=0, batch_size=8)
    stats = dowser.probe(model, None, layers=2, n_samples=4, batch_size=2, n_rademacher=2,
                         seq_len=12, progress=False)
    masks = dowser.build_masks(model, stats, rho=0.0)
    params = dict(model.named_parameters())
    opt = dowser.MaskedAdamW([params[n] for n in masks], masks, model=model, lr=1e-2)
    data = torch.randint(3, 90, (4, 12), generator=torch.Generator().manual_seed(0))
    model.train()
    for _ in range(3):
        model(input_ids=data, labels=data).loss.backward()
        opt.step()
        opt.zero_grad()
    assert meter.measure(model).kl == 0.0
    # the same run at rho = 0.5 does move it (a random tiny model: the sign is noise)
    masks = dowser.build_masks(model, stats, rho=0.5)
    opt = dowser.MaskedAdamW([params[n] for n in masks], masks, model=model, lr=1e-2)
    for _ in range(3):
        model(input_ids=data, labels=data).loss.backward()
        opt.step()
        opt.zero_grad()
    assert meter.measure(model).kl != 0.0


def test_grows_with_the_learning_rate():
    base = tiny_llama(seed=0)
    meter = ForgettingMeter(base, n_samples=32, max_tokens=24, seed=0, batch_size=16)
    data = torch.randint(3, 90, (8, 16), generator=torch.Generator().manual_seed(1))
    kls = []
    for lr in (1e-4, 1e-3, 1e-2):
        model = copy.deepcopy(base).train()
        opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
        for _ in range(5):
            model(input_ids=data, labels=data).loss.backward()
            opt.step()
            opt.zero_grad()
        r = meter.measure(model)
        kls.append((r.kl, r.kl_se))
    assert kls[0][0] < kls[1][0] < kls[2][0], kls
    assert kls[2][0] - kls[1][0] > 2 * kls[2][1]


def test_stored_state_is_n_by_tokens_not_vocabulary():
    sizes = []
    for vocab in (97, 3000):
        base = tiny_llama(vocab=vocab, seed=0)
        meter = ForgettingMeter(base, n_samples=6, max_tokens=12, seed=0, batch_size=3)
        tensors = [v for v in vars(meter).values() if isinstance(v, torch.Tensor)]
        assert sum(t.numel() * t.element_size() for t in tensors) == meter.nbytes
        assert all(t.numel() <= 6 * 12 for t in tensors)
        sizes.append(meter.nbytes)
    assert sizes[0] == sizes[1]


def test_measure_keeps_modes_dtype_and_grads():
    base = tiny_llama(seed=0)
    meter = ForgettingMeter(base, n_samples=4, max_tokens=12, seed=0)
    model = copy.deepcopy(base).train()
    model.model.layers[0].eval()
    modes = {n: m.training for n, m in model.named_modules()}
    meter.measure(model)
    assert modes == {n: m.training for n, m in model.named_modules()}
    assert all(p.grad is None for p in model.parameters())
    bf = copy.deepcopy(base).to(torch.bfloat16)
    r = meter.measure(bf)  # runs in bf16: a small, nonzero drift from the fp32 base
    assert next(bf.parameters()).dtype == torch.bfloat16
    assert r.ce != r.base_ce and abs(r.kl) < 0.01 and r.agreement > 0.8


@pytest.mark.parametrize("build", [tiny_llava, tiny_qwen2_vl])
def test_vision_language_models(build):
    base = build(seed=0)
    meter = ForgettingMeter(base, n_samples=4, max_tokens=12, seed=0, batch_size=2)
    assert meter.measure(copy.deepcopy(base)).kl == 0.0
    tuned = _perturbed(base, 0.05)
    r = meter.measure(tuned)
    assert r.kl != 0.0 and abs(r.kl - _exact_kl_on_contexts(meter, base, tuned)) < 4 * r.kl_se


def test_bad_input_one_line():
    base = tiny_llama(seed=0)
    for kw, what in ((dict(n_samples=0), "n_samples"), (dict(max_tokens=4), "max_tokens"),
                     (dict(batch_size=0), "batch_size")):
        with pytest.raises(ValueError, match=what) as e:
            ForgettingMeter(base, **kw)
        assert "\n" not in str(e.value)
    meter = ForgettingMeter(base, n_samples=4, max_tokens=12, seed=0)
    with pytest.raises(ValueError, match="vocabulary") as e:
        meter.measure(tiny_llama(vocab=50, seed=0))
    assert "\n" not in str(e.value)


# ----------------------------------------------------------------------------- trainer callback

transformers = pytest.importorskip("transformers")


class _Texts(torch.utils.data.Dataset):
    def __init__(self, n=16):
        gen = torch.Generator().manual_seed(0)
        self.items = [torch.randint(3, 90, (12,), generator=gen) for _ in range(n)]

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        ids = self.items[i]
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def _trainer(model, out, steps, lr=1e-2):
    args = transformers.TrainingArguments(
        output_dir=str(out), per_device_train_batch_size=4, max_steps=steps, learning_rate=lr,
        logging_steps=1, report_to=[], use_cpu=True, save_strategy="no", seed=0,
        dataloader_num_workers=0, disable_tqdm=True)
    return transformers.Trainer(model=model, args=args, train_dataset=_Texts())


def test_callback_logs_through_the_trainer(tmp_path):
    from dowser.integrations.forgetting import watch_forgetting

    model = _peaked()
    meter = ForgettingMeter(model, n_samples=8, max_tokens=16, seed=0)
    trainer = _trainer(model, tmp_path, 4)
    seen, modes = [], []

    class Spy(transformers.TrainerCallback):  # what a TensorBoard/W&B callback receives
        def on_log(self, args, state, control, logs=None, **kw):
            seen.append(dict(logs))

        def on_step_begin(self, args, state, control, model=None, **kw):
            modes.append(model.training)

    trainer.add_callback(Spy())
    cb = watch_forgetting(trainer, meter, every=2)
    trainer.train()
    logged = [h for h in trainer.state.log_history if "forgetting/kl" in h]
    assert [h["step"] for h in logged] == [2, 4]
    assert [s for s, _ in cb.history] == [2, 4]
    assert logged[-1]["forgetting/kl"] == cb.history[-1][1].kl > 0
    assert {"forgetting/kl_se", "forgetting/ce", "forgetting/agreement", "forgetting/seconds",
            "forgetting/cost_in_steps"} <= set(logged[-1])
    assert sum("forgetting/kl" in s for s in seen) == 2
    # training goes on in train mode after the measurement at step 2 (Trainer calls train()
    # inside the step, so the mode at the first step's begin is the model's initial eval)
    assert modes[1:] == [True] * 3


def test_callback_stops_or_warns_at_the_budget(tmp_path):
    from dowser.integrations.forgetting import ForgettingCallback, watch_forgetting

    base = _peaked()
    meter = ForgettingMeter(base, n_samples=8, max_tokens=16, seed=0)
    trainer = _trainer(copy.deepcopy(base), tmp_path, 8, lr=3e-2)
    cb = watch_forgetting(trainer, meter, every=1, budget=1e-4, on_budget="stop")
    with pytest.warns(UserWarning, match="budget exceeded at step 1"):
        trainer.train()
    assert trainer.state.global_step == 1 and len(cb.history) == 1
    assert trainer.state.log_history[0]["forgetting/over_budget"] == 1.0

    trainer = _trainer(copy.deepcopy(base), tmp_path, 3, lr=3e-2)
    cb = watch_forgetting(trainer, meter, every=1, budget=1e-4, on_budget="warn")
    with pytest.warns(UserWarning, match="budget exceeded"):
        trainer.train()
    assert trainer.state.global_step == 3 and len(cb.history) == 3

    with pytest.raises(ValueError, match="on_budget"):
        ForgettingCallback(meter, trainer, on_budget="halt")
    unbound = ForgettingCallback(meter, every=1)
    trainer = _trainer(copy.deepcopy(base), tmp_path, 1)
    trainer.add_callback(unbound)
    with warnings.catch_warnings(), pytest.raises(ValueError, match="watch_forgetting"):
        trainer.train()


# ----------------------------------------------------------------------------- CLI

def _cli(argv, capsys):
    from dowser import cli

    capsys.readouterr()
    rc = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def test_cli_argument_errors_before_any_model_loads(monkeypatch, capsys, tmp_path):
    import json

    from dowser import cli

    def no_load(*a, **k):
        pytest.fail("a model was loaded before the arguments were checked")

    monkeypatch.setattr(cli, "_load_model", no_load)
    base, other = tmp_path / "base", tmp_path / "other"
    for d, vocab in ((base, 97), (other, 50)):
        d.mkdir()
        (d / "config.json").write_text(json.dumps({"model_type": "llama", "num_hidden_layers": 2,
                                                   "vocab_size": vocab}))
    cases = [((base,), "TUNED, or BASE plus --delta"),
             ((base, base, "--delta", tmp_path / "d.safetensors"), "one of the two"),
             ((base, "--delta", tmp_path / "missing.safetensors"), "no such file"),
             ((base, tmp_path / "nowhere"), "no such directory"),
             ((base, other), "vocabulary of 50"),
             ((base, base, "--max-tokens", "4"), "at least 8"),
             ((base, base, "--n-samples", "0"), "at least 1")]
    for args, msg in cases:
        rc, out, err = _cli(["forgetting", *args], capsys)
        assert rc == 2 and msg in err and len(err.strip().splitlines()) == 1, (args, err)


def test_cli_end_to_end(tmp_path, capsys):
    import json

    base = tiny_llama(seed=0)
    base.save_pretrained(tmp_path / "base")
    _perturbed(base, 0.05).save_pretrained(tmp_path / "tuned")
    rc, out, err = _cli(["forgetting", tmp_path / "base", tmp_path / "base", "--n-samples", "4",
                         "--max-tokens", "12", "--json"], capsys)
    assert rc == 0, err
    assert json.loads(out)["kl"] == 0.0
    rc, out, err = _cli(["forgetting", tmp_path / "base", tmp_path / "tuned", "--n-samples", "4",
                         "--max-tokens", "12"], capsys)
    assert rc == 0 and "KL(base || tuned)" in out, err
