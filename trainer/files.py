"""Atomic file writes (a crash never leaves a half-written file where a good one was), and file digests."""
from __future__ import annotations

import hashlib
import json
import os
import shutil

import numpy as np


def _tmp_path(path: str) -> str:
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    return os.path.join(folder, f".{os.path.basename(path)}.{os.getpid()}.tmp")


def write_bytes(path: str, data: bytes) -> None:
    tmp = _tmp_path(path)
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_json(path: str, obj) -> None:
    write_bytes(path, (json.dumps(obj, indent=2, default=_plain) + "\n").encode())


def copy(src: str, dst: str) -> None:
    tmp = _tmp_path(dst)
    try:
        shutil.copyfile(src, tmp)
        os.replace(tmp, dst)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def save_npz(path: str, **arrays) -> None:
    tmp = _tmp_path(path) + ".npz"
    try:
        np.savez(tmp, **arrays)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _plain(obj):
    """JSON fallback for numpy scalars and arrays."""
    if hasattr(obj, "tolist"):
        return obj.tolist()
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def sha256(path: str) -> str:
    """Hex sha256 of a file's bytes, read in blocks (a model file may be hundreds of MB)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
