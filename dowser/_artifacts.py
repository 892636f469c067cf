"""One safetensors file format for everything dowser writes: probe statistics, masks, deltas.

A dowser file is a safetensors file whose metadata holds a JSON object under the key "dowser"
with at least `kind` and `format_version`. `read_header` checks a path without loading any
tensor (and without torch), so the CLI can refuse a wrong file before it loads a model.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from typing import Any, Iterable

FORMAT_VERSION = 1

# kind -> what a user calls it (used in error messages)
KINDS = {"dowser.ProbeStats": "statistics", "dowser.MaskSet": "mask", "dowser.Delta": "delta"}

_MAX_HEADER = 100 * 1024 * 1024  # safetensors' own limit


class ArtifactError(ValueError):
    """A path that is not the dowser file it should be (missing, foreign, other kind, too new)."""


def _label(kind: str) -> str:
    return KINDS.get(kind, kind)


def read_header(path: str | os.PathLike, kind: str) -> dict[str, Any]:
    """The dowser metadata of the file at `path`, checked to be of `kind` (e.g.
    "dowser.MaskSet"), from its header alone. Raises ArtifactError with a one-line message."""
    what = f"a dowser {_label(kind)} file"
    path = os.fspath(path)
    if not os.path.exists(path):
        raise ArtifactError(f"{path}: no such file (expected {what})")
    if os.path.isdir(path):
        raise ArtifactError(f"{path} is a directory, not {what}")
    try:
        with open(path, "rb") as fh:
            head = fh.read(8)
            n = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
            if not 2 <= n <= min(_MAX_HEADER, os.path.getsize(path) - 8):
                raise ValueError
            header = json.loads(fh.read(n))
    except (ValueError, UnicodeDecodeError, OSError, struct.error):
        raise ArtifactError(f"{path} is not {what} (not a safetensors file)") from None
    meta = (header.get("__metadata__") or {}) if isinstance(header, dict) else {}
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


def save(path: str | os.PathLike, tensors: dict[str, Any], kind: str, metadata: dict[str, Any],
         plain: Iterable[str] = ()) -> None:
    """Write `tensors` (CPU, contiguous, unshared) with `metadata` under `kind`. Keys in
    `plain` are also written as top-level string fields, readable by any safetensors tool."""
    from safetensors.torch import save_file

    meta = dict(metadata)
    meta["kind"] = kind
    meta["format_version"] = FORMAT_VERSION
    flat = {"dowser": json.dumps(meta)}
    for key in plain:
        if key in meta:
            flat[key] = str(meta[key])
    save_file(tensors, os.fspath(path), metadata=flat)


def load(path: str | os.PathLike, kind: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """(metadata without `kind`, every tensor) of a dowser file of `kind`."""
    from safetensors import safe_open

    meta = read_header(path, kind)
    with safe_open(os.fspath(path), framework="pt") as fh:
        tensors = {k: fh.get_tensor(k) for k in fh.keys()}
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
