"""Whether dowser's Triton kernels (installed as `dowser.kernels`, one op per module) can run.

The kernel modules import only where triton is installed. On a host without a GPU, they run in
Triton's interpreter when TRITON_INTERPRET=1 is set before triton is first imported.

`kernels/` has no `__init__.py` on purpose: a folder without one is a namespace portion, which
Python's import system never prefers over a regular package, so this folder cannot shadow the
`kernels` distribution (Hugging Face's hub kernels, imported by transformers >= 5.25) when the
repository root is on sys.path (pytest, `python -c` from the clone). See docs/development.md.
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
