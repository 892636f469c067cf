"""Every file dowser writes is replaced atomically, and a damaged file fails its load in one line
naming the file and what is wrong (dowser/_artifacts.py)."""

import json
import os
import signal
import struct
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from dowser import MaskSet
from dowser._artifacts import ArtifactError, atomic_path, read_header

# Large enough that a save takes a while (32 MiB of int32 words in 8 tensors), so kills land
# before, during and after the data is written.
N_MASKS, WORDS = 8, 1 << 20

# The child saves a MaskSet whose every word is `fill` over `path`, after telling the parent it
# starts (line "go"); run with a "time" argument it also reports how long the save took.
CHILD = textwrap.dedent("""
    import sys, time, torch
    from dowser import MaskSet
    path, fill = sys.argv[1], int(sys.argv[2])
    n, words = {n}, {words}
    masks = {{f"layer{{i}}.weight": torch.full((words,), fill, dtype=torch.int32) for i in range(n)}}
    shapes = {{k: (words * 32,) for k in masks}}
    ms = MaskSet(masks, shapes, {{"rho": 0.5, "fill": fill}})
    print("go", flush=True)
    t0 = time.perf_counter()
    ms.save(path)
    print(time.perf_counter() - t0, flush=True)
""").format(n=N_MASKS, words=WORDS)


def _masks(fill: int, words: int = 64) -> MaskSet:
    masks = {f"layer{i}.weight": torch.full((words,), fill, dtype=torch.int32) for i in range(3)}
    return MaskSet(masks, {k: (words * 32,) for k in masks}, {"rho": 0.5, "fill": fill})


def _start(path, fill):
    env = {**os.environ, "DOWSER_DISABLE_CPP": "1"}  # the file layer needs no C++ ops
    proc = subprocess.Popen([sys.executable, "-W", "ignore", "-c", CHILD, str(path), str(fill)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    line = proc.stdout.readline().strip()
    assert line == "go", line + proc.stderr.read()[-2000:]
    return proc


def _fill_of(path) -> int:
    ms = MaskSet.load(path)
    fills = {int(v.unique().item()) for v in ms.values()}
    assert len(fills) == 1 and len(ms) == N_MASKS
    assert ms.metadata["fill"] == fills.pop()
    return ms.metadata["fill"]


@pytest.mark.slow
def test_a_killed_save_leaves_the_old_or_the_new_file_never_a_broken_one(tmp_path):
    """SIGKILL a process that saves a large mask file over an existing one at several moments
    of its write: afterwards the file always loads whole, with the old or the new content."""
    path = tmp_path / "masks.safetensors"
    proc = _start(path, 1)  # the old file, and how long one save takes here
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-2000:]
    duration = float(out.strip().splitlines()[-1])
    assert _fill_of(path) == 1

    outcomes = []
    # before the write, along it, and around the rename at its end
    for i, frac in enumerate((0.0, 0.2, 0.4, 0.6, 0.8, 1.0, 1.3)):
        new = 2 + i
        old = _fill_of(path)
        proc = _start(path, new)
        time.sleep(duration * frac)
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=600)
        found = _fill_of(path)  # raises if the file does not load whole
        assert found in (old, new), (frac, old, new, found)
        outcomes.append(found == new)
    # the kills hit more than the finished save: at least the earliest one kept the old file
    assert not outcomes[0], outcomes
    for leftover in tmp_path.iterdir():  # a killed save may leave a hidden temp file, only
        assert leftover == path or leftover.name.startswith("."), leftover


def test_a_normal_save_leaves_only_the_target_with_a_plain_files_mode(tmp_path):
    path = tmp_path / "m.safetensors"
    _masks(1).save(path)
    _masks(2).save(path)  # over an existing file
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.safetensors"]
    assert MaskSet.load(path).metadata["fill"] == 2
    umask = os.umask(0)
    os.umask(umask)
    assert os.stat(path).st_mode & 0o777 == 0o666 & ~umask  # not mkstemp's 0600


def test_a_failed_save_keeps_the_old_file_and_removes_its_temp(tmp_path):
    path = tmp_path / "m.safetensors"
    _masks(1).save(path)
    with pytest.raises(RuntimeError, match="disk full"):
        with atomic_path(path) as tmp:
            with open(tmp, "wb") as fh:
                fh.write(b"partial")
            raise RuntimeError("disk full")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.safetensors"]
    assert MaskSet.load(path).metadata["fill"] == 1


def _one_line(excinfo, path, *words):
    msg = str(excinfo.value)
    assert "\n" not in msg and str(path) in msg, msg
    for w in words:
        assert w in msg, msg


@pytest.mark.parametrize("keep", [0, 5, 8, 20, "header", "data"])
def test_a_truncated_file_fails_in_one_line_naming_it(tmp_path, keep):
    path = tmp_path / "m.safetensors"
    _masks(7).save(path)
    blob = path.read_bytes()
    n = struct.unpack("<Q", blob[:8])[0]
    cut = {"header": 8 + n // 2, "data": 8 + n + (len(blob) - 8 - n) // 2}.get(keep, keep)
    path.write_bytes(blob[:cut])
    with pytest.raises(ArtifactError) as excinfo:
        MaskSet.load(path)
    _one_line(excinfo, path, *(("truncated",) if keep in ("header", "data", 20) else ()))


def test_corrupted_data_or_header_fails_in_one_line_naming_what(tmp_path):
    path = tmp_path / "m.safetensors"
    _masks(7).save(path)
    blob = bytearray(path.read_bytes())
    n = struct.unpack("<Q", blob[:8])[0]
    # a flipped bit in the tensor data: the CRC of the tensor that holds it names it
    data = bytearray(blob)
    data[-5] ^= 0x10
    path.write_bytes(bytes(data))
    with pytest.raises(ArtifactError) as excinfo:
        MaskSet.load(path)
    _one_line(excinfo, path, "corrupted", "layer2.weight", "CRC")
    # a damaged header: not JSON any more
    head = bytearray(blob)
    head[8 + n // 2] = ord("\x00")
    path.write_bytes(bytes(head))
    with pytest.raises(ArtifactError) as excinfo:
        read_header(path, "dowser.MaskSet")
    _one_line(excinfo, path, "corrupted header")
    # tensor offsets that do not tile the data: trailing bytes
    path.write_bytes(bytes(blob) + b"\0" * 16)
    with pytest.raises(ArtifactError) as excinfo:
        MaskSet.load(path)
    _one_line(excinfo, path, "corrupted")


def test_a_file_written_before_the_checksums_still_loads(tmp_path):
    """Files from before this format carried CRCs load unchecked (same format version)."""
    from safetensors.torch import save_file

    ms = _masks(3)
    path = tmp_path / "old.safetensors"
    meta = {**ms.metadata, "shapes": {k: list(v) for k, v in ms.shapes.items()},
            "kind": "dowser.MaskSet", "format_version": 1}
    save_file(dict(ms), str(path), metadata={"dowser": json.dumps(meta)})
    assert MaskSet.load(path).metadata["fill"] == 3
