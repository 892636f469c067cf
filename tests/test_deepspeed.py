"""DeepSpeed ZeRO-2/3 with dowser's gradient-hook mode on 2 CPU ranks (issue #8). Needs the
optional `deepspeed` package (`pip install -e ".[deepspeed]"`); skipped without it."""

from __future__ import annotations

import pytest
import torch

import dowser
from tests import dist_workers as W
from tests.test_distributed import _spawn

pytest.importorskip("deepspeed", reason="deepspeed is not installed (optional extra)")


@pytest.mark.parametrize("stage", [2, 3])
def test_zero_with_gradient_hooks_keeps_frozen_entries(tmp_path, stage):
    model = W.tiny()
    stats = dowser.probe(model, n_samples=4, batch_size=2, seq_len=W.SEQ, n_rademacher=2,
                         progress=False)
    masks = dowser.build_masks(model, stats, rho=0.2)
    masks.save(str(tmp_path / "masks.safetensors"))
    _spawn(W.deepspeed_train, str(tmp_path), stage)
    res = torch.load(tmp_path / f"deepspeed-{stage}.pt")
    moved = 0
    for name, packed in masks.items():
        p0, p1 = res["init"][name], res["final"][name]
        frozen = ~dowser.ops.unpack_mask(packed, p0.shape)
        assert torch.equal(p1[frozen], p0[frozen]), f"ZeRO-{stage} moved frozen entries of {name}"
        moved += int((p1 != p0)[~frozen].sum())
    assert moved > 0
    assert "weight_decay=0.1" in res["refused"]
