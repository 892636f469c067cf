"""One safetensors file format for everything dowser writes: probe statistics, masks, deltas.

A dowser file is a safetensors file whose metadata holds a JSON object under the key "dowser"
with at least `kind` and `format_version`. `read_header` checks a path without loading any
tensor (and without torch), so the CLI can refuse a wrong file before it loads a model.

Every file is written atomically (`atomic_path`): to a temporary file in the target's folder,
flushed and fsync'ed, then renamed over the target, so a crash, a kill or a full disk during a
save leaves the previous file whole. Each tensor's bytes carry a CRC-32 in the metadata, so a
load names the file and the tensor whose data changed on disk (files written before the
checksums load unchecked).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import struct
import tempfile
import zlib
from typing import Any, Iterable, Iterator

FORMAT_VERSION = 1

# kind -> what a user calls it (used in error messages)
KINDS = {"dowser.ProbeStats": "statistics", "dowser.MaskSet": "mask", "dowser.Delta": "delta"}

_MAX_HEADER = 100 * 1024 * 1024  # safetensors' own limit


class ArtifactError(ValueError):
    """A path that is not the dowser file it should be (missing, foreign, other kind, too new)."""


def _label(kind: str) -> str:
    return KINDS.get(kind, kind)


def _check_extent(path: str, header: dict[str, Any], data_bytes: int) -> None:
    """The tensors' byte ranges must tile the data section exactly: a shorter file was cut
    off during a write (or a copy), a longer or gappy one is not what safetensors wrote."""
    end = 0
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            lo, hi = (int(x) for x in entry["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise ArtifactError(f"{path}: corrupted header (tensor {name!r} has no valid "
                                "data_offsets)") from None
        if not 0 <= lo <= hi:
            raise ArtifactError(f"{path}: corrupted header (tensor {name!r} has data_offsets "
                                f"[{lo}, {hi}])")
        end = max(end, hi)
    if end > data_bytes:
        raise ArtifactError(f"{path} is truncated: its tensors need {end} bytes of data, the "
                            f"file holds {data_bytes}")
    if end < data_bytes:
        raise ArtifactError(f"{path}: corrupted ({data_bytes - end} bytes after the last "
                            "tensor)")


def read_header(path: str | os.PathLike, kind: str) -> dict[str, Any]:
    """The dowser metadata of the file at `path`, checked to be of `kind` (e.g.
    "dowser.MaskSet"), from its header alone. Raises ArtifactError with a one-line message."""
    what = f"a dowser {_label(kind)} file"
    path = os.fspath(path)
    if not os.path.exists(path):
        raise ArtifactError(f"{path}: no such file (expected {what})")
    if os.path.isdir(path):
        raise ArtifactError(f"{path} is a directory, not {what}")
    size = os.path.getsize(path)
    try:
        with open(path, "rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                raise ArtifactError(f"{path} is not {what} (not a safetensors file: "
                                    f"{size} bytes, shorter than a header)")
            n = struct.unpack("<Q", head)[0]
            if not 2 <= n <= _MAX_HEADER:
                raise ArtifactError(f"{path} is not {what} (not a safetensors file: "
                                    f"header length {n})")
            if n > size - 8:
                raise ArtifactError(f"{path} is truncated: its header needs {n} bytes, the file "
                                    f"has {size - 8} after the length")
            header = json.loads(fh.read(n))
    except (ValueError, UnicodeDecodeError, struct.error):
        raise ArtifactError(f"{path} is not {what} (corrupted header: not valid JSON)") from None
    except OSError as exc:
        raise ArtifactError(f"{path}: cannot read ({exc.strerror or exc})") from None
    if not isinstance(header, dict):
        raise ArtifactError(f"{path} is not {what} (corrupted header: not a JSON object)")
    _check_extent(path, header, size - 8 - n)
    meta = header.get("__metadata__") or {}
    try:
        info = json.loads(meta["dowser"])
        found = info["kind"]
    except (KeyError, TypeError, ValueError):
        raise ArtifactError(f"{path} is not {what} (a safetensors file without dowser "
                            "metadata)") from None
    if found != kind:
        raise ArtifactError(f"{path} is a dowser {_label(found)} file, not {what}")
    version = info.get("format_version", -1)
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise ArtifactError(f"{path} has format version {version}; this dowser reads up to "
                            f"{FORMAT_VERSION}: upgrade dowser")
    return info


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[str]:
    """Yield a temporary path in `path`'s folder for the caller to write; on success, fsync it,
    rename it over `path` and fsync the folder. On any error (or a kill) `path` keeps its old
    content; the temporary file is removed unless the process dies mid-write (then it is a
    hidden `.NAME.*.tmp` next to the target)."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=folder)
    os.close(fd)
    try:
        yield tmp
        # mkstemp makes the file 0600; give it the mode a plain open() would.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        with open(tmp, "rb+") as fh:
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_dir(folder)


def _fsync_dir(folder: str) -> None:
    # The rename is durable once the folder's entry is on disk (POSIX; not possible on Windows).
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _crc(t: Any) -> int:
    # CRC-32 of the bytes safetensors stores (little-endian, row-major)
    flat = t.detach().contiguous().reshape(-1)
    if flat.numel() == 0:
        return 0
    import torch

    return zlib.crc32(memoryview(flat.view(torch.uint8).numpy()))


def save(path: str | os.PathLike, tensors: dict[str, Any], kind: str, metadata: dict[str, Any],
         plain: Iterable[str] = ()) -> None:
    """Write `tensors` (CPU, contiguous, unshared) with `metadata` under `kind`, atomically
    (see `atomic_path`). Keys in `plain` are also written as top-level string fields,
    readable by any safetensors tool."""
    from safetensors.torch import save_file

    meta = dict(metadata)
    meta["kind"] = kind
    meta["format_version"] = FORMAT_VERSION
    flat = {"dowser": json.dumps(meta), "dowser_crc32": json.dumps({k: _crc(v) for k, v in tensors.items()})}
    for key in plain:
        if key in meta:
            flat[key] = str(meta[key])
    with atomic_path(path) as tmp:
        save_file(tensors, tmp, metadata=flat)


def load(path: str | os.PathLike, kind: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """(metadata without `kind`, every tensor) of a dowser file of `kind`. Raises
    ArtifactError (one line, naming the file) for a truncated or corrupted file."""
    from safetensors import safe_open

    meta = read_header(path, kind)
    path = os.fspath(path)
    try:
        with safe_open(path, framework="pt") as fh:
            crcs = json.loads((fh.metadata() or {}).get("dowser_crc32", "{}"))
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    except ArtifactError:
        raise
    except Exception as exc:  # safetensors' own checks (dtype/shape vs byte range, ...)
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ArtifactError(f"{path}: corrupted ({msg})") from None
    for name, want in crcs.items():
        if name not in tensors:
            raise ArtifactError(f"{path}: corrupted (tensor {name!r} is missing)")
        if _crc(tensors[name]) != want:
            raise ArtifactError(f"{path}: corrupted (the data of tensor {name!r} fails its "
                                "CRC-32 check)")
    meta.pop("kind", None)
    return meta, tensors


def model_identity(model: Any) -> dict[str, str]:
    """model_name, model_class and config_hash (class + every parameter's name and shape)."""
    cfg = getattr(model, "config", None)
    name = getattr(cfg, "name_or_path", None) or getattr(cfg, "_name_or_path", None) or ""
    h = hashlib.sha256(type(model).__name__.encode())
    for pname, p in model.named_parameters():
        h.update(f"{pname}:{tuple(p.shape)};".encode())
    return {"model_name": name or type(model).__name__, "model_class": type(model).__name__,
            "config_hash": h.hexdigest()[:16]}


_CHUNK = 1 << 22  # entries hashed per step: bounded temporaries for big matrices


def frozen_hash(param: Any, packed: Any) -> str:
    """sha256 (hex, 32 chars) of a parameter's frozen entries: dtype, shape, then the raw bytes
    of every entry whose mask bit is 0, in row-major order. Same on every device. (Masks bind
    to a model with it and deltas check their base with it.)"""
    import torch

    from dowser._checks import check_packed
    from dowser.distributed import _is_dtensor
    from dowser.ops import unpack_mask

    check_packed("mask", packed, param.numel())
    h = hashlib.sha256(f"{param.dtype}:{tuple(param.shape)};".encode())
    t = param.detach()
    if _is_dtensor(t):  # a sharded parameter: every rank gathers it (a collective) and agrees
        t = t.full_tensor()
    flat = t.reshape(-1)
    frozen = ~unpack_mask(packed.detach().cpu(), (param.numel(),))
    for start in range(0, flat.numel(), _CHUNK):
        part = flat[start:start + _CHUNK].cpu()[frozen[start:start + _CHUNK]]
        h.update(part.contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:32]
