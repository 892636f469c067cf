"""pack_mask / unpack_mask: every backend against the reference, bit for bit."""

import pytest
import torch

import dowser
from dowser import _registry
from dowser import reference
from dowser.ops import pack_mask, popcount, unpack_mask
from tests.conftest import backend_fn

BACKENDS = _registry.backends("pack_mask")  # every registered backend (unusable: skipped)
SHAPES = [(0,), (1,), (1, 1), (31,), (32,), (33,), (1, 97), (33, 97), (5, 7, 3), (64, 65), (4099,)]


def _random_mask(shape, p, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(shape, generator=gen) < p


def test_layout_is_lsb_first_row_major():
    mask = torch.zeros(3, 25, dtype=torch.bool)
    mask[0, 0] = mask[1, 6] = mask[2, 24] = True  # flat 0, 31, 74
    words = reference.pack_mask(mask)
    assert words.dtype == torch.int32 and words.tolist() == [1 | (1 << 31) - (1 << 32), 0, 1 << 10]
    flat = mask.flatten()
    for i in range(flat.numel()):
        assert bool((int(words[i // 32]) >> (i % 32)) & 1) == bool(flat[i])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("p", [0.0, 0.3, 1.0])
def test_pack_matches_reference(backend, shape, p, device):
    fn = backend_fn("pack_mask", backend, device)
    mask = _random_mask(shape, p).to(device)
    got = fn(mask)
    assert got.dtype == torch.int32 and got.device.type == torch.device(device).type
    assert torch.equal(got.cpu(), reference.pack_mask(mask.cpu()))


@pytest.mark.parametrize("backend", BACKENDS)
def test_pack_non_contiguous(backend, device):
    fn = backend_fn("pack_mask", backend, device)
    base = _random_mask((67, 45), 0.5, seed=3).to(device)
    for view in (base.t(), base[::2, 1::3], base[:, 5]):
        assert not view.is_contiguous()
        assert torch.equal(fn(view).cpu(), reference.pack_mask(view.contiguous().cpu()))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", SHAPES)
def test_unpack_round_trip(backend, shape, device):
    fn = backend_fn("unpack_mask", backend, device)
    mask = _random_mask(shape, 0.5, seed=1)
    packed = reference.pack_mask(mask).to(device)
    got = fn(packed, mask.numel())
    assert got.dtype == torch.bool
    assert torch.equal(got.cpu().view(shape), mask)


def test_public_ops_round_trip_and_popcount(device):
    mask = _random_mask((33, 97), 0.1, seed=2).to(device)
    packed = pack_mask(mask)
    assert popcount(packed) == int(mask.sum())
    assert torch.equal(unpack_mask(packed, mask.shape), mask)


def test_bad_input_gets_clear_errors():
    with pytest.raises(ValueError, match="bool"):
        pack_mask(torch.ones(4))
    with pytest.raises(TypeError):
        pack_mask([True, False])
    packed = pack_mask(torch.ones(40, dtype=torch.bool))
    with pytest.raises(ValueError, match="expected \\(1,\\)"):
        unpack_mask(packed, (20,))
    with pytest.raises(ValueError, match="padding"):
        unpack_mask(packed[:2], (33,))  # 40 bits set, but only 33 entries
    with pytest.raises(ValueError, match="int32"):
        unpack_mask(packed.to(torch.int64), (40,))


def test_op_schema_and_fake_kernels():
    # torch.library's own checker: schema, fake (meta) kernel, and that the op traces.
    mask = _random_mask((33, 97), 0.5)
    torch.library.opcheck(torch.ops.dowser.pack_mask, (mask,), test_utils=("test_schema", "test_faketensor"))
    packed = reference.pack_mask(mask)
    torch.library.opcheck(torch.ops.dowser.unpack_mask, (packed, mask.numel()),
                          test_utils=("test_schema", "test_faketensor"))


def test_selfcheck_passes():
    rows = dowser.selfcheck("cpu")
    assert {r["op"] for r in rows} >= {"pack_mask", "unpack_mask"}
    assert all(r["result"] == "ok" for r in rows)
