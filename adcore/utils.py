"""Seeding, atomic file writes and small helpers shared by training, evaluation and the runner."""
from __future__ import annotations

import hashlib
import io
import json
import os
import random
import tempfile
from pathlib import Path

import numpy as np
import torch


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and CUDA) so that a CPU run is repeatable bit for bit."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


def set_deterministic(flag: bool = True, *, warn_only: bool = False) -> None:
    """Make (``flag=True``) or stop making CUDA runs repeatable to the digit on one GPU and software stack.

    Sets ``torch.use_deterministic_algorithms(flag)``, which the fused anomaly attention follows (its dQ then comes
    from the atomic-free kernel, see :func:`adcore.ops.anomaly_attention`) and which makes torch raise for any op
    without a deterministic implementation (``warn_only=True``: warn instead); cuDNN's deterministic algorithms
    without autotuning (``cudnn.benchmark`` picks by timing); and ``CUBLAS_WORKSPACE_CONFIG=:4096:8``, which
    deterministic cuBLAS needs (read when CUDA first initialises cuBLAS, so call this before the first CUDA matmul).
    On CPU adcore's runs are already repeatable at a fixed thread count; this costs nothing there.
    """
    torch.use_deterministic_algorithms(flag, warn_only=warn_only)
    torch.backends.cudnn.deterministic = flag
    torch.backends.cudnn.benchmark = False if flag else torch.backends.cudnn.benchmark
    if flag:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")


def atomic_write_bytes(path, data: bytes) -> Path:
    """Write ``data`` to ``path`` via a temporary file in the same folder and ``os.replace``.

    A reader never sees a half-written file, and an interrupted write leaves the old file (or nothing) behind. The
    file gets the permissions a plain ``open`` would give it (0666 less the umask), not mkstemp's 0600.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        umask = os.umask(0o022)  # read it (os.umask only reads by setting), then put it back at once
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def atomic_torch_save(obj, path) -> Path:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return atomic_write_bytes(path, buf.getvalue())


def atomic_write_json(obj, path) -> Path:
    return atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True, default=_json_default) + "\n").encode())


def _json_default(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    if isinstance(o, (tuple, set)):
        return list(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def params_hash(params: dict, length: int = 10) -> str:
    """A short stable hash of a parameter dict (keys sorted), used to key runs and results files."""
    text = json.dumps(params, sort_keys=True, default=_json_default)
    return hashlib.sha256(text.encode()).hexdigest()[:length]


def resolve_device(device: str | torch.device | None) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device} was requested but CUDA is not available; use device='cpu'")
    return device
