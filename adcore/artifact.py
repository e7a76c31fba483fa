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

What :func:`load` checks, in this order, before any model is built:

1. the file is a regular file, a zip archive of uncompressed entries (as ``torch.save`` writes) of at most
   :data:`MAX_FILE_BYTES`, read from the zip directory, so a compressed "bomb" is refused before it is inflated;
   ``expect_sha256`` (``--expect-sha256``) pins the whole file's SHA-256;
2. ``torch.load(weights_only=True)``: only tensors and plain data, never an arbitrary object;
3. the metadata: a registered model name; ``model_params`` plain, short and taken by the model's constructor;
   ``image_size`` in [:data:`MIN_IMAGE_SIDE`, :data:`MAX_IMAGE_SIDE`]; a threshold that is absent or finite;
4. the checksum;
5. the model is built on PyTorch's ``meta`` device (no memory, no weights read): every tensor the file holds must
   have the name, shape and dtype that model expects (a kNN memory bank may have any number of rows), all of them
   together at most :data:`MAX_FILE_BYTES`; floating-point tensors must be finite and standard deviations and
   variances non-negative.

Only then is the model built for real, with its frozen backbones' weights taken from the file: loading never reads a
backbone checkpoint from the hub cache and never downloads one (model files hold every weight, frozen backbone
included, even where training checkpoints leave it out).

The checksum guards against damage (a cut download, a flipped bit), not against a malicious author: anyone can
recompute it after changing a value. Steps 1-3 and 5 are what keep a hostile file from running code, exhausting
memory or giving silently absurd scores; ``--expect-sha256`` is how to be sure a file is the one you tested.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import inspect
import json
import math
import os
import pickle
import stat
import warnings
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
    "color": "RGB: grey and palette images are converted to 3 channels, 16-bit grey is scaled by its bit depth "
             "(v * 255 / 65535, rounded); float and 32-bit integer images are refused",
    "resize": "PIL's `resample` filter to image_size x image_size (antialiased when downscaling), aspect not kept",
    "scale": "uint8 / 255 -> float32 (B, 3, S, S) in [0, 1]",
    "normalisation": "none outside the model: a model that wants ImageNet mean/std applies it inside",
}


#: Largest model file (and largest total of its tensors): WideResNet-50-2 models are about 0.3 GB, kNN banks grow.
MAX_FILE_BYTES = 4 << 30
#: Bounds on the input side S stored in a file (the papers use 224-512).
MIN_IMAGE_SIDE, MAX_IMAGE_SIDE = 8, 2048
#: Bounds on model_params: |numbers|, string length, list length, number of keys.
MAX_PARAM_NUMBER, MAX_PARAM_STR, MAX_PARAM_LIST, MAX_PARAMS = 1_000_000, 1024, 64, 64
# State-dict entries whose first dimension is learned, not set by the parameters (kNN's memory bank).
_ROWS_VARY = ("memory_bank",)


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


def file_sha256(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _check_archive(path: Path, expect_sha256: str | None) -> str:
    """Steps 1 of the module docstring; returns the file's SHA-256."""
    if not path.exists():
        raise FileNotFoundError(f"model file {str(path)!r} does not exist")
    if not stat.S_ISREG(path.stat().st_mode):
        raise ArtifactError(f"model file {str(path)!r} is not a regular file (a pipe, device or folder)")
    size = path.stat().st_size
    if size > MAX_FILE_BYTES:
        raise ArtifactError(f"model file {str(path)!r} is {size:,} bytes, over the {MAX_FILE_BYTES:,} adcore reads")
    sha = file_sha256(path)
    if expect_sha256 is not None and sha != expect_sha256.strip().lower():
        raise ArtifactError(f"model file {str(path)!r} has SHA-256 {sha}, not the expected {expect_sha256.strip()}")
    try:
        with zipfile.ZipFile(path) as z:
            entries = z.infolist()
    except (zipfile.BadZipFile, OSError) as e:
        raise ArtifactError(f"model file {str(path)!r} is damaged or not a torch archive (not a zip: {e})") from None
    packed = [e.filename for e in entries if e.compress_type != zipfile.ZIP_STORED]
    if packed:
        raise ArtifactError(f"model file {str(path)!r} has compressed entries ({packed[0]}, ...); torch.save and "
                            "adcore write them uncompressed, so it is refused before anything is inflated")
    total = sum(e.file_size for e in entries)
    if total > MAX_FILE_BYTES:
        raise ArtifactError(f"model file {str(path)!r} declares {total:,} bytes of contents, over {MAX_FILE_BYTES:,}")
    return sha


def _finite(v) -> bool:
    return not isinstance(v, bool) and isinstance(v, (int, float)) and math.isfinite(v)


def _check_param(value, where: str) -> None:
    if isinstance(value, bool) or value is None:
        return
    if isinstance(value, (int, float)):
        if not (math.isfinite(value) and abs(value) <= MAX_PARAM_NUMBER):
            raise ArtifactError(f"{where} = {value!r} is out of range (finite, at most {MAX_PARAM_NUMBER:,} in size)")
    elif isinstance(value, str):
        if len(value) > MAX_PARAM_STR:
            raise ArtifactError(f"{where} is a string of {len(value)} characters (at most {MAX_PARAM_STR})")
    elif isinstance(value, (list, tuple)):
        if len(value) > MAX_PARAM_LIST:
            raise ArtifactError(f"{where} is a list of {len(value)} items (at most {MAX_PARAM_LIST})")
        for i, v in enumerate(value):
            _check_param(v, f"{where}[{i}]")
    else:
        raise ArtifactError(f"{where} is a {type(value).__name__}; model parameters are numbers, strings and lists")


def check_threshold(threshold, where: str = "the threshold") -> None:
    """ArtifactError unless ``threshold`` is None or a record with finite values and non-negative spreads."""
    if threshold is None:
        return
    if not isinstance(threshold, dict):
        raise ArtifactError(f"{where} is a {type(threshold).__name__}, not a threshold record")
    for key in ("value", "pixel_value", "map_floor"):
        if not _finite(threshold.get(key)):
            raise ArtifactError(f"{where} {key} is {threshold.get(key)!r}; a threshold must be a finite number")
    for key in ("target_fpr", "achievable_fpr"):
        if key in threshold and not (_finite(threshold[key]) and 0 <= threshold[key] <= 1):
            raise ArtifactError(f"{where} {key} is {threshold[key]!r}, not a rate in [0, 1]")
    scores = threshold.get("holdout_scores") or []
    if not all(_finite(v) for v in scores):
        raise ArtifactError(f"{where} holds held-out scores that are not finite numbers")
    std = (threshold.get("holdout_summary") or {}).get("std", 0.0)
    if not (_finite(std) and std >= 0):
        raise ArtifactError(f"{where} has a held-out standard deviation of {std!r}; it cannot be negative")


def check_metadata(obj: dict, path) -> None:
    """Step 3 of the module docstring: the metadata is what this adcore can build, within the stated limits."""
    from .registry import model_class

    try:
        cls = model_class(obj.get("model_name"))
    except (ValueError, TypeError) as e:
        raise ArtifactError(f"model file {str(path)!r}: {e}") from None
    params = obj.get("model_params")
    if not isinstance(params, dict) or len(params) > MAX_PARAMS:
        raise ArtifactError(f"model file {str(path)!r}: model_params must be a dict of at most {MAX_PARAMS} entries")
    sig = inspect.signature(cls.__init__)
    takes = [k for k in sig.parameters if k != "self"]
    unknown = [k for k in params if k not in takes]
    if unknown and not any(p.kind is p.VAR_KEYWORD for p in sig.parameters.values()):
        raise ArtifactError(f"model file {str(path)!r}: {obj['model_name']} takes no parameter(s) {unknown}")
    for key, value in params.items():
        _check_param(value, f"model file {str(path)!r}: model_params[{key!r}]")
    pre = obj.get("preprocessing")
    side = pre.get("image_size") if isinstance(pre, dict) else None
    if isinstance(side, bool) or not isinstance(side, int) or not MIN_IMAGE_SIDE <= side <= MAX_IMAGE_SIDE:
        raise ArtifactError(f"model file {str(path)!r}: preprocessing image_size is {side!r}, not an int in "
                            f"[{MIN_IMAGE_SIDE}, {MAX_IMAGE_SIDE}]")
    if not (_finite(pre.get("sigma")) and 0 <= pre["sigma"] <= 64):
        raise ArtifactError(f"model file {str(path)!r}: preprocessing sigma is {pre.get('sigma')!r}, not in [0, 64]")
    if pre.get("resample") not in ("bilinear", "bicubic"):
        raise ArtifactError(f"model file {str(path)!r}: preprocessing resample is {pre.get('resample')!r}")
    if "image_size" in params and params["image_size"] != side:
        raise ArtifactError(f"model file {str(path)!r}: model_params image_size {params['image_size']!r} differs from "
                            f"the preprocessing's {side}")
    check_threshold(obj.get("threshold"), f"model file {str(path)!r}: the threshold")


def read(path, expect_sha256: str | None = None) -> dict:
    """The checked contents of a model file (metadata and ``state_dict``), without building the model; steps 1-4 of
    the module docstring. ``file_sha256`` is added: the SHA-256 of the whole file.

    Raises:
        FileNotFoundError: no such file.
        ArtifactError: unsafe, damaged, too large, out of the stated limits, not the expected SHA-256, written by
            another adcore version, or not an adcore model file.
    """
    path = Path(path)
    sha = _check_archive(path, expect_sha256)
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
    check_metadata(obj, path)
    meta = {k: v for k, v in obj.items() if k not in ("state_dict", "checksum")}
    if obj.get("checksum") != _checksum(meta, state_dict):
        raise ArtifactError(f"model file {str(path)!r} is damaged: its contents do not match their checksum "
                            "(changed or corrupted after it was written)")
    obj["file_sha256"] = sha
    return obj


@contextlib.contextmanager
def _backbone_weights_from_file():
    """Build models without reading any backbone checkpoint: the backbone loaders hand back uninitialised tensors
    of the right shapes (filled from the model file right after), so nothing is read from the hub cache or the
    efficientnet package and nothing is downloaded."""
    from . import backbones

    def placeholder(build):
        def load(weights_path=None):
            with torch.device("meta"):
                shapes = build().state_dict()
            # on the CPU even inside the meta skeleton (the WRN builder refuses meta leftovers); torch.empty does not
            # touch its pages, so this costs address space, not memory
            return ({k: torch.empty(v.shape, dtype=v.dtype, device="cpu") for k, v in shapes.items()},
                    Path("<the model file>"))
        return load

    def wrn():
        import torchvision
        return torchvision.models.wide_resnet50_2(weights=None)

    def effnet():
        import timm
        return timm.create_model("efficientnet_lite0", pretrained=False)

    saved = backbones.load_wide_resnet50_2_state, backbones._load_efficientnet_lite0_state
    backbones.load_wide_resnet50_2_state = placeholder(wrn)
    backbones._load_efficientnet_lite0_state = placeholder(effnet)
    try:
        yield
    finally:
        backbones.load_wide_resnet50_2_state, backbones._load_efficientnet_lite0_state = saved


def check_tensors(obj: dict, path) -> None:
    """Step 5 of the module docstring: the file's tensors are the ones its model expects, finite, under the cap."""
    from .registry import create_model

    try:
        with torch.device("meta"), _backbone_weights_from_file(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # copying into meta tensors warns that it does nothing: that is the point
            skeleton = create_model(obj["model_name"], **obj["model_params"])
    except Exception as e:  # a constructor's own refusal of its parameters
        raise ArtifactError(f"model file {str(path)!r}: model {obj['model_name']!r} cannot be built from its "
                            f"model_params ({type(e).__name__}: {str(e)[:300]})") from None
    built = sum(t.numel() * t.element_size() for t in (*skeleton.parameters(), *skeleton.buffers()))
    if built > MAX_FILE_BYTES:
        raise ArtifactError(f"model file {str(path)!r}: its model_params build a model of {built:,} bytes, over "
                            f"{MAX_FILE_BYTES:,}")
    expected, state = skeleton.state_dict(), obj["state_dict"]
    if set(expected) != set(state):
        missing, extra = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
        raise ArtifactError(f"model file {str(path)!r} does not fit model {obj['model_name']!r}: missing "
                            f"{missing[:3]}, unexpected {extra[:3]}")
    for key, want in expected.items():
        got = state[key]
        shape_ok = (tuple(got.shape[1:]) == tuple(want.shape[1:]) and got.dim() == want.dim()
                    if key.rsplit(".", 1)[-1] in _ROWS_VARY else tuple(got.shape) == tuple(want.shape))
        if not shape_ok or got.dtype != want.dtype:
            raise ArtifactError(f"model file {str(path)!r}: tensor {key} is {got.dtype} {tuple(got.shape)}, but "
                                f"{obj['model_name']} with these parameters expects {want.dtype} {tuple(want.shape)}")
        if got.is_floating_point():
            if not bool(torch.isfinite(got).all()):
                raise ArtifactError(f"model file {str(path)!r}: tensor {key} holds NaN or infinite values")
            name = key.rsplit(".", 1)[-1]
            if (name.endswith(("std", "var")) or name == "running_var") and bool((got < 0).any()):
                raise ArtifactError(f"model file {str(path)!r}: statistic {key} is negative; a spread cannot be")


def load(path, device="cpu", expect_sha256: str | None = None):
    """Read a file written by :func:`save` and return the model, in eval mode, ready to score.

    The file's metadata (preprocessing, threshold, recipe, training, ``file_sha256``) is on ``model.artifact``.
    Every check of the module docstring runs before the model is built; nothing is downloaded.

    Raises:
        FileNotFoundError: no such file.
        ArtifactError: unsafe (holds more than tensors and plain data: refused without running it), damaged, out
            of the stated limits, not ``expect_sha256``, written by another adcore version, or its weights do not fit
            the model it names.
    """
    from .registry import create_model
    from .utils import resolve_device

    obj = read(path, expect_sha256)
    check_tensors(obj, path)
    try:
        with _backbone_weights_from_file(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = create_model(obj["model_name"], **obj["model_params"])
        model.load_state_dict(obj["state_dict"], strict=True)
    except (ValueError, RuntimeError, TypeError) as e:
        raise ArtifactError(f"model file {str(path)!r} does not fit model {obj['model_name']!r} in this adcore "
                            f"({type(e).__name__}: {str(e)[:300]})") from None
    model.artifact = {k: v for k, v in obj.items() if k not in ("state_dict", "checksum")}  # file_sha256 kept
    model.artifact["path"] = os.fspath(path)
    return model.to(resolve_device(device)).eval()
