"""Shared test setup: Triton in interpreter mode on CPU-only hosts, gpu/slow markers, backends."""

import os
from pathlib import Path

import pytest  # noqa: E402
import torch  # noqa: E402

# Without a GPU, Triton kernels run in its interpreter. This must be set before triton is first
# imported (importing torch does not import it).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from dowser import _registry  # noqa: E402

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
SOURCE_TREE = Path(__file__).resolve().parents[1]


def source_path(*parts: str) -> Path:
    """A file of the clone that is not part of the package (bench/, pyproject.toml). Where the
    tests run against an installed wheel, outside the clone (.ci/run's wheel block), the test
    that needs it is skipped, saying so."""
    path = SOURCE_TREE.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"needs the source tree's {'/'.join(parts)} (tests run outside the clone)")
    return path


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if item.get_closest_marker("gpu") is not None:  # not `in keywords`: a dir may be named gpu
            item.add_marker(skip)


def backend_fn(op: str, backend: str, device: str = "cpu"):
    """The `backend` kernel of `op` on `device`, or skip the test saying why it is unusable."""
    impl = _registry._IMPLS.get(op, {}).get(backend)
    if impl is None:
        pytest.skip(f"{op} has no {backend} kernel")
    dev = torch.device(device).type
    if dev not in impl.devices and backend != "reference":
        pytest.skip(f"{op}/{backend} does not run on {dev}")
    why = impl.unavailable(dev)
    if why is not None:
        pytest.skip(f"{op}/{backend} unavailable on {dev}: {why}")
    return impl.fn


@pytest.fixture
def use_backend(monkeypatch):
    """Route torch.ops.dowser.* to one backend (skipping when it is unusable here)."""

    def use(backend: str, device: str = "cpu") -> None:
        backend_fn("masked_adamw_step", backend, device)
        monkeypatch.setenv("DOWSER_BACKEND", backend)

    return use


@pytest.fixture(params=DEVICES)
def device(request):
    return request.param
