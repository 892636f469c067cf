"""Sparse task deltas: bit-exact restore, file size, and refusal of a base it was not made for."""

import copy
import json
import struct

import pytest
import torch

import dowser
from dowser.ops import unpack_mask
from tests.models import tiny_llama

PROBE = dict(n_samples=4, batch_size=2, n_rademacher=2, seq_len=16, progress=False)


def _finetune(model, masks, steps=3, seed=0):
    """A few real MaskedAdamW steps (weight decay on), like a user's run."""
    opt = dowser.MaskedAdamW([p for p in model.parameters() if p.requires_grad], masks,
                             model=model, lr=1e-2, weight_decay=0.1)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        ids = torch.randint(3, 90, (4, 12), generator=gen)
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    return model


def _header_len(path):
    with open(path, "rb") as fh:
        return 8 + struct.unpack("<Q", fh.read(8))[0]


@pytest.mark.parametrize("dtype,rho", [(torch.float32, 0.0), (torch.float32, 0.1), (torch.float32, 1.0),
                                       (torch.bfloat16, 0.1), (torch.float16, 0.1)])
def test_round_trip_is_bit_exact_and_small(tmp_path, dtype, rho):
    base = tiny_llama(n_layers=3, dtype=dtype)
    tuned = copy.deepcopy(base)
    masks = dowser.prepare(tuned, None, rho=rho, layers=2, **PROBE)
    _finetune(tuned, masks)
    path = tmp_path / "task.safetensors"
    info = dowser.save_delta(tuned, masks, path, base=base)

    restored = copy.deepcopy(base)
    got = dowser.apply_delta(restored, path)
    for (name, p), q in zip(tuned.named_parameters(), restored.parameters()):
        assert p.detach().view(-1).view(torch.uint8).equal(q.detach().view(-1).view(torch.uint8)), name
    assert got.keys() == masks.keys() and all(torch.equal(got[n], masks[n]) for n in masks)

    # size: exactly the trainable values + packed masks + dense 1-D parameters + header
    elt = torch.tensor([], dtype=dtype).element_size()
    tuned_bytes = sum(masks.counts()[n][1] for n in masks) * elt
    n_masked = sum(masks.counts()[n][1] for n in masks)
    words = sum(masks[n].numel() for n in masks) * 4
    k = sum(masks.counts()[n][0] for n in masks)
    dense = sum(p.numel() for n, p in tuned.named_parameters() if n not in masks and p.requires_grad)
    assert info["values"] == k and info["dense"] == dense
    body = info["bytes"] - _header_len(path)
    assert body == k * elt + words + dense * elt
    # against the bound: rho * (tuned bytes) + n/8 for the masks, with rounding of k
    # (at most half an entry per matrix) and of the mask words (< 4 bytes per matrix)
    slack = len(masks) * (elt + 4)
    assert body - dense * elt <= rho * tuned_bytes + n_masked / 8 + slack
    assert body - dense * elt >= rho * tuned_bytes + n_masked / 8 - slack


def test_refuses_a_base_it_was_not_made_for(tmp_path):
    base = tiny_llama(n_layers=3)
    tuned = copy.deepcopy(base)
    masks = dowser.prepare(tuned, None, rho=0.1, layers=2, **PROBE)
    _finetune(tuned, masks)
    path = tmp_path / "task.safetensors"
    dowser.save_delta(tuned, masks, path, base=base)

    other = tiny_llama(n_layers=3, seed=1)  # same names and shapes, other weights
    snapshot = {n: p.detach().clone() for n, p in other.named_parameters()}
    with pytest.raises(ValueError, match="frozen entries of 'model.layers.1.self_attn.q_proj.weight' differ"):
        dowser.apply_delta(other, path)
    # one frozen entry changed is enough
    nudged = copy.deepcopy(base)
    name = "model.layers.2.mlp.down_proj.weight"
    frozen_idx = (~unpack_mask(masks[name], masks.shapes[name])).reshape(-1).nonzero()[-1]
    with torch.no_grad():
        nudged.get_parameter(name).view(-1)[frozen_idx] += 1e-3
    with pytest.raises(ValueError, match="down_proj.weight' differ"):
        dowser.apply_delta(nudged, path)
    # nothing was written by the refused calls
    for n, p in other.named_parameters():
        assert torch.equal(p, snapshot[n]), n
    with pytest.raises(ValueError, match="has no parameter"):
        dowser.apply_delta(tiny_llama(n_layers=2), path)
    with pytest.raises(ValueError, match=r"is \(64, 32\) float32 here but \(48, 32\) float32"):
        dowser.apply_delta(tiny_llama(n_layers=3, intermediate=64), path)
    with pytest.raises(ValueError, match="bfloat16 here"):
        dowser.apply_delta(copy.deepcopy(base).to(torch.bfloat16), path)
    with pytest.raises(dowser._artifacts.ArtifactError, match="mask file, not a dowser delta"):
        masks.save(tmp_path / "m.safetensors")
        dowser.apply_delta(base, tmp_path / "m.safetensors")


def test_save_refuses_a_model_that_is_not_a_finetune_of_base(tmp_path):
    base = tiny_llama(n_layers=3)
    tuned = copy.deepcopy(base)
    masks = dowser.prepare(tuned, None, rho=0.1, layers=2, **PROBE)
    with torch.no_grad():  # a frozen entry moved (say, by a plain optimizer)
        tuned.model.layers[1].self_attn.v_proj.weight.view(-1)[
            (~unpack_mask(masks["model.layers.1.self_attn.v_proj.weight"], (16 * 32,))).nonzero()[0]] += 1
    with pytest.raises(ValueError, match="frozen entries of 'model.layers.1.self_attn.v_proj.weight'"):
        dowser.save_delta(tuned, masks, tmp_path / "d.safetensors", base=base)
    tuned = copy.deepcopy(base)
    with torch.no_grad():
        tuned.model.embed_tokens.weight[0, 0] += 1  # outside the delta
    with pytest.raises(ValueError, match="parameter 'model.embed_tokens.weight' differ"):
        dowser.save_delta(tuned, masks, tmp_path / "d.safetensors", base=base, dense=[])


def test_metadata_and_default_dense(tmp_path):
    base = tiny_llama(n_layers=3)
    tuned = copy.deepcopy(base)
    masks = dowser.prepare(tuned, None, rho=0.25, layers=1, **PROBE)
    _finetune(tuned, masks)
    path = tmp_path / "d.safetensors"
    dowser.save_delta(tuned, masks, path)  # no base: dense = requires_grad non-masked params
    meta = dowser._artifacts.read_header(path, "dowser.Delta")
    assert meta["rho"] == 0.25 and set(meta["masked"]) == set(masks)
    assert meta["dense"] == ["model.layers.2.input_layernorm.weight",
                             "model.layers.2.post_attention_layernorm.weight"]
    assert all(len(meta["params"][n]["frozen_sha256"]) == 32 for n in masks)
    json.dumps(meta)
    restored = copy.deepcopy(base)
    dowser.apply_delta(restored, path)
    x = torch.randint(3, 90, (2, 9))
    assert torch.equal(restored(input_ids=x).logits, tuned(input_ids=x).logits)
