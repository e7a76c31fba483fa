"""``adcore.save`` / ``adcore.load``: one self-contained model file that is safe to share.

The file is a ``torch.save`` archive of plain data and tensors only, so that :func:`load` reads it with
``torch.load(..., weights_only=True)``: a file that carries any other Python object (a malicious pickle, say) is
refused before anything in it runs. It holds::

    format, format_version    "adcore-model", 1
    adcore_version            the version that wrote it; any other version refuses to load it
    model_name, model_params  enough for create_model(model_name, **model_params)
    state_dict                every weight and learned statistic (memory bank, min-max, discrepancy statistics:
                              models keep them as registered buffers)
    preprocessing             image_size, how images are read, resized and scaled; the post-processing (sigma)
    recipe                    the Recipe it was trained with, as a dict (or None)
    threshold                 the decision threshold and how it was fitted (or None): see adcore.deploy.threshold
    training                  what it was trained on (or None)
    checksum                  SHA-256 over everything above, so a damaged file is refused, not half-loaded

Loading it in a fresh process gives the same scores bit for bit (the weights are stored exactly).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pickle
import zipfile
from pathlib import Path

import numpy as np
import torch

from .data.folder import check_resample
from .utils import _json_default, atomic_torch_save

FORMAT = "adcore-model"
FORMAT_VERSION = 1

#: How every adcore reader turns a file into a model input (``adcore.data.folder.read_image``); stored in each file.
READER = {
    "reader": "adcore.data.folder.read_image",
    "color": "RGB: grey and palette images are converted to 3 channels, 16-bit grey is scaled to 8 bit",
    "resize": "PIL's `resample` filter to image_size x image_size (antialiased when downscaling), aspect not kept",
    "scale": "uint8 / 255 -> float32 (B, 3, S, S) in [0, 1]",
    "normalisation": "none outside the model: a model that wants ImageNet mean/std applies it inside",
}


class ArtifactError(ValueError):
    """A model file cannot be loaded: unsafe, damaged, from another adcore version, or not an adcore file."""


def _version() -> str:
    from . import __version__
    return __version__


def _plain(obj, where: str):
    """``obj`` with Paths as str and NumPy scalars as Python numbers; TypeError for anything not plain data."""
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, (np.integer, np.floating, np.bool_)):
        return obj.item()
    if isinstance(obj, (list, tuple)):
        return type(obj)(_plain(v, f"{where}[{i}]") for i, v in enumerate(obj))
    if isinstance(obj, dict):
        bad = [k for k in obj if not isinstance(k, str)]
        if bad:
            raise TypeError(f"{where} has a non-string key {bad[0]!r}; a model file holds plain data only")
        return {k: _plain(v, f"{where}[{k!r}]") for k, v in obj.items()}
    raise TypeError(f"{where} is a {type(obj).__name__}; a model file holds plain data (str, numbers, lists, dicts) "
                    "and tensors only")


def _checksum(meta: dict, state_dict: dict) -> str:
    h = hashlib.sha256(json.dumps(meta, sort_keys=True, default=_json_default).encode())
    for key in sorted(state_dict):
        t = state_dict[key].detach().cpu().contiguous().reshape(-1)
        h.update(f"\0{key}\0{t.dtype}\0{tuple(state_dict[key].shape)}\0".encode())
        h.update(t.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def load_plain(path, what: str = "file") -> dict:
    """``torch.load(path, weights_only=True)`` with clear errors; never unpickles an arbitrary object.

    Args:
        path: the file.
        what: how the messages name it ("model file", "checkpoint").

    Raises:
        FileNotFoundError: no such file.
        ArtifactError: the file holds objects other than tensors and plain data (refused before any of it runs), or
            it is damaged / not a torch archive.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} {str(path)!r} does not exist")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        # torch's weights-only unpickler stops at the first global it does not allow, before calling anything
        blocked = [ln.strip() for ln in str(e).splitlines() if "GLOBAL" in ln]
        if not blocked:  # not a pickle of anything: garbage bytes
            raise ArtifactError(f"{what} {str(path)!r} is damaged or not a torch archive (UnpicklingError: "
                                f"{[ln for ln in str(e).splitlines() if 'Unsupported' in ln][:1]})") from None
        raise ArtifactError(f"refused to load {what} {str(path)!r}: it holds Python objects other than tensors and "
                            f"plain data, which adcore never writes, and loading it could run code. Nothing in it was "
                            f"run. Only load files from people you trust. ({blocked[0][:200]})") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError, KeyError, IndexError) as e:
        raise ArtifactError(f"{what} {str(path)!r} is damaged or not a torch archive ({type(e).__name__}: "
                            f"{str(e)[:200]})") from None
    if not isinstance(obj, dict):
        raise ArtifactError(f"{what} {str(path)!r} holds a {type(obj).__name__}, not the dict adcore writes")
    return obj


def save(model, path, *, image_size: int | None = None, resample: str | None = None, recipe=None,
         threshold: dict | None = None, training: dict | None = None, sigma: float = 4.0) -> Path:
    """Write ``model`` and everything needed to score images with it to one file (atomically).

    Args:
        model: a model made by ``adcore.create_model`` (its ``model_params`` are stored) and trained.
        path: the file to write, e.g. ``model.pt``.
        image_size: side S of the square input; default the loaded artifact's, the recipe's, or the model's own
            ``image_size`` attribute.
        resample: how images were resized, ``"bilinear"`` or ``"bicubic"``; default the loaded artifact's, the
            recipe's, or bilinear.
        recipe: the :class:`adcore.recipes.Recipe` (or a dict) it was trained with; default: the loaded artifact's.
        threshold: the decision threshold record (``adcore.deploy.threshold.fit_threshold``); default: the loaded
            artifact's, else none.
        training: free-form plain facts about the training data and run.
        sigma: the Gaussian σ of the shared post-processing.

    Returns:
        The path written.
    """
    name, params = getattr(model, "model_name", None), getattr(model, "model_params", None)
    if name is None or params is None:
        raise TypeError(f"save needs a model made by adcore.create_model (so that its name and parameters are known),"
                        f" got {type(model).__name__}")
    previous = getattr(model, "artifact", None) or {}
    if dataclasses.is_dataclass(recipe):
        recipe = dataclasses.asdict(recipe)
    recipe = recipe if recipe is not None else previous.get("recipe")
    if image_size is None:
        image_size = (previous.get("preprocessing") or {}).get("image_size") or (recipe or {}).get("image_size") \
            or getattr(model, "image_size", None)
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
        raise ValueError(f"save needs the input side: pass image_size=<int> (got {image_size!r})")
    resample = resample or (previous.get("preprocessing") or {}).get("resample") or (recipe or {}).get("resample") \
        or "bilinear"
    check_resample(resample)
    meta = _plain({
        "format": FORMAT, "format_version": FORMAT_VERSION, "adcore_version": _version(),
        "model_name": name, "model_params": dict(params),
        "preprocessing": {"image_size": image_size, "resample": resample, **READER, "sigma": float(sigma),
                          "image_score": "model-defined score (pred_score)" if getattr(model, "own_image_score", False)
                          else "max of smoothed map"},
        "recipe": recipe, "threshold": threshold if threshold is not None else previous.get("threshold"),
        "training": training if training is not None else previous.get("training"),
    }, "the model file's metadata")
    state_dict = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    return atomic_torch_save({**meta, "state_dict": state_dict, "checksum": _checksum(meta, state_dict)}, path)


def read(path) -> dict:
    """The checked contents of a model file (metadata and ``state_dict``), without building the model.

    Raises:
        ArtifactError: unsafe, damaged, written by another adcore version, or not an adcore model file.
    """
    obj = load_plain(path, "model file")
    if obj.get("format") != FORMAT:
        raise ArtifactError(f"{str(path)!r} is not an adcore model file (a torch archive without format "
                            f"{FORMAT!r}; a training checkpoint last.pt is not a model file either: "
                            "python -m adcore train writes one)")
    if obj.get("format_version") != FORMAT_VERSION or obj.get("adcore_version") != _version():
        raise ArtifactError(f"{str(path)!r} was written by adcore {obj.get('adcore_version')} (file format "
                            f"{obj.get('format_version')}); this is adcore {_version()} (format {FORMAT_VERSION}). "
                            f"Scores are only guaranteed within one version: retrain it with this version, or load it"
                            f" with adcore {obj.get('adcore_version')}")
    state_dict = obj.get("state_dict")
    if not isinstance(state_dict, dict) or not all(torch.is_tensor(v) for v in state_dict.values()):
        raise ArtifactError(f"model file {str(path)!r} is damaged: its state_dict is missing or not all tensors")
    meta = {k: v for k, v in obj.items() if k not in ("state_dict", "checksum")}
    if obj.get("checksum") != _checksum(meta, state_dict):
        raise ArtifactError(f"model file {str(path)!r} is damaged: its contents do not match their checksum "
                            "(changed or corrupted after it was written)")
    return obj


def load(path, device="cpu"):
    """Read a file written by :func:`save` and return the model, in eval mode, ready to score.

    The file's metadata (preprocessing, threshold, recipe, training) is on ``model.artifact``.

    Raises:
        FileNotFoundError: no such file.
        ArtifactError: unsafe (holds more than tensors and plain data: refused without running it), damaged,
            written by another adcore version, or its weights do not fit the model it names.
    """
    from .registry import create_model
    from .utils import resolve_device

    obj = read(path)
    try:
        model = create_model(obj["model_name"], **obj["model_params"])
        model.load_state_dict(obj["state_dict"], strict=True)
    except (ValueError, RuntimeError, TypeError) as e:
        raise ArtifactError(f"model file {str(path)!r} does not fit model {obj['model_name']!r} in this adcore "
                            f"({type(e).__name__}: {str(e)[:300]})") from None
    model.artifact = {k: v for k, v in obj.items() if k not in ("state_dict", "checksum")}
    model.artifact["path"] = os.fspath(path)
    return model.to(resolve_device(device)).eval()
