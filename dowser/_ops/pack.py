"""dowser::pack_mask / dowser::unpack_mask: bool <-> bit-packed int32 words."""

from __future__ import annotations

import torch

from dowser import reference
from dowser._checks import words_for
from dowser._registry import define, register
from dowser.selfcheck import add_case


def _fake_pack(mask: torch.Tensor) -> torch.Tensor:
    return mask.new_empty((words_for(mask.numel()),), dtype=torch.int32)


def _fake_unpack(packed: torch.Tensor, numel: int) -> torch.Tensor:
    return packed.new_empty((numel,), dtype=torch.bool)


pack_mask_op = define("pack_mask", "(Tensor mask) -> Tensor", _fake_pack)
unpack_mask_op = define("unpack_mask", "(Tensor packed, SymInt numel) -> Tensor", _fake_unpack)

register("pack_mask", "reference", ("cpu", "cuda"))(reference.pack_mask)
register("unpack_mask", "reference", ("cpu", "cuda"))(reference.unpack_mask)


@register("pack_mask", "cpp", ("cpu",), cpp_symbol="pack_mask_cpu")
def _pack_cpp(mask: torch.Tensor) -> torch.Tensor:
    from dowser import _ext

    return _ext.load().pack_mask_cpu(mask)


@register("unpack_mask", "cpp", ("cpu",), cpp_symbol="unpack_mask_cpu")
def _unpack_cpp(packed: torch.Tensor, numel: int) -> torch.Tensor:
    from dowser import _ext

    return _ext.load().unpack_mask_cpu(packed, numel)


@register("pack_mask", "triton", ("cpu", "cuda"))
def _pack_triton(mask: torch.Tensor) -> torch.Tensor:
    from dowser.kernels import pack

    return pack.pack_mask(mask)


@register("unpack_mask", "triton", ("cpu", "cuda"))
def _unpack_triton(packed: torch.Tensor, numel: int) -> torch.Tensor:
    from dowser.kernels import pack

    return pack.unpack_mask(packed, numel)


def _selfcheck_inputs(gen: torch.Generator) -> tuple:
    return (torch.rand(37, 101, generator=gen) < 0.3,)


def _selfcheck_unpack_inputs(gen: torch.Generator) -> tuple:
    return (reference.pack_mask(torch.rand(1000, generator=gen) < 0.5), 1000)


add_case("pack_mask", _selfcheck_inputs)
add_case("unpack_mask", _selfcheck_unpack_inputs)
