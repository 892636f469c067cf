"""Triton kernels of dowser, installed as `dowser.kernels` (one op per module).

Importable only where triton is installed. On a host without a GPU, the kernels run in
Triton's interpreter when TRITON_INTERPRET=1 is set before triton is first imported.
"""

from __future__ import annotations

import importlib.util
import os


def triton_unavailable_reason(device: str) -> str | None:
    """None when Triton kernels can run on `device` ('cpu' or 'cuda'), else why not."""
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed"
    if device == "cpu":
        if os.environ.get("TRITON_INTERPRET") != "1":
            return "Triton runs on CPU only in interpreter mode (TRITON_INTERPRET=1)"
        return None
    if device == "cuda":
        import torch

        if not torch.cuda.is_available():
            return "no CUDA device"
        if os.environ.get("TRITON_INTERPRET") == "1":
            return "TRITON_INTERPRET=1 is set: Triton would run on the host"
        return None
    return f"Triton does not run on {device}"
