"""``python -m adcore export``: one ONNX graph from images to (image score, anomaly map), checked before it is kept.

The graph is :class:`adcore.deploy.postprocess.ScoringGraph` exported with ``torch.onnx.export(dynamo=True)``:
input ``images`` float32 (B, 3, S, S) in [0, 1] with a dynamic batch B, outputs ``score`` (B,) and ``anomaly_map``
(B, S, S), the project's post-processing (bilinear upsample, Gaussian σ = 4, max) inside. The models' fused ops run
their PyTorch references (``ADCORE_BACKEND=torch``): Triton kernels do not export.

The file's metadata (``metadata_props``) carries what a runtime without PyTorch needs: the threshold, the pixel
threshold, the input side and the preprocessing, as JSON under ``adcore``.

Before the file is written, ONNX Runtime runs it on a fixed batch of random images at two batch sizes and its maps
must match the torch path to 1e-4 of their range (and the scores likewise); otherwise nothing is written and the
error gives the numbers.
"""
from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path

import numpy as np
import torch

#: Largest allowed |map_onnx − map_torch| / (range of map_torch), and the same for scores.
TOLERANCE = 1e-4


class ExportError(RuntimeError):
    """The model cannot be exported, or its export does not reproduce the torch path; the message says why."""


@contextlib.contextmanager
def _torch_backend():
    old = os.environ.get("ADCORE_BACKEND")
    os.environ["ADCORE_BACKEND"] = "torch"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("ADCORE_BACKEND", None)
        else:
            os.environ["ADCORE_BACKEND"] = old


def _check_exportable(model) -> None:
    triton = sorted({type(m).__name__ for m in model.modules() if getattr(m, "backend", None) == "triton"})
    if triton:
        raise ExportError(f"{', '.join(triton)} were built with backend='triton'; Triton kernels do not export to "
                          "ONNX. Rebuild the model with backend='auto' (the file keeps its weights) and export again")


def agreement(graph, session, images: torch.Tensor) -> dict:
    """Run the torch graph and an ONNX Runtime session on ``images``; the relative differences and both outputs."""
    with torch.no_grad():
        score_t, map_t = (t.numpy() for t in graph(images))
    score_o, map_o = session.run(["score", "anomaly_map"], {"images": images.numpy()})
    map_range = float(map_t.max() - map_t.min()) or 1.0
    score_range = float(score_t.max() - score_t.min()) if len(score_t) > 1 else abs(float(score_t[0]))
    return {"map_rel": float(np.abs(map_o - map_t).max()) / map_range,
            "score_rel": float(np.abs(score_o - score_t).max()) / (score_range or 1.0),
            "score_torch": score_t, "score_onnx": score_o, "map_torch": map_t, "map_onnx": map_o}


def onnx_session(path):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def export_onnx(model_path, out, *, check: bool = True) -> dict:
    """Export the model file ``model_path`` to the ONNX file ``out``; returns the check's numbers per batch size.

    Raises:
        ExportError: the model cannot be exported (the exporter's reason), or ONNX Runtime does not reproduce the
            torch path to :data:`TOLERANCE`.
    """
    from ..artifact import load

    model = load(model_path)
    return export_model(model, out, model.artifact, check=check)


def export_model(model, out, meta: dict, *, check: bool = True) -> dict:
    """Export ``model`` with the model-file metadata ``meta`` (preprocessing, threshold, ...) to ``out``.

    Raises:
        ExportError: as :func:`export_onnx`.
    """
    try:
        import onnx
    except ImportError as e:
        raise ExportError("ONNX export needs the deploy extra: pip install -e \".[deploy]\"") from e
    from .postprocess import ScoringGraph

    _check_exportable(model)
    name = meta.get("model_name", type(model).__name__)
    size, sigma = meta["preprocessing"]["image_size"], meta["preprocessing"]["sigma"]
    graph = ScoringGraph(model, size, sigma).eval()
    gen = torch.Generator().manual_seed(0)
    example = torch.rand(2, 3, size, size, generator=gen)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with _torch_backend(), tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.") as tmp:
        tmp_path = Path(tmp) / out.name
        try:
            torch.onnx.export(graph, (example,), str(tmp_path), dynamo=True, external_data=False,
                              input_names=["images"], output_names=["score", "anomaly_map"],
                              dynamic_shapes={"images": {0: torch.export.Dim("batch")}}, verbose=False)
        except Exception as e:  # the exporter's own errors are many and deep; keep the gist and the type
            lines = [ln for ln in str(e).splitlines() if ln.strip()]
            gist = " | ".join(lines[:3])[:600]
            raise ExportError(f"model {name!r} cannot be exported to ONNX: {type(e).__name__}: {gist}") from e
        proto = onnx.load(str(tmp_path))
        onnx.helper.set_model_props(proto, {"adcore": json.dumps({
            "adcore_version": meta.get("adcore_version"), "model_name": name,
            "model_params": meta.get("model_params"), "preprocessing": meta["preprocessing"],
            "threshold": {k: v for k, v in (meta.get("threshold") or {}).items() if k != "holdout_scores"},
            "inputs": "images: float32 (B, 3, S, S) in [0, 1], RGB",
            "outputs": "score: (B,) image score, anomalous if > threshold.value; anomaly_map: (B, S, S)",
        }, default=list)})
        onnx.save(proto, str(tmp_path))
        result = {}
        if check:
            session = onnx_session(tmp_path)
            for b in (1, 3):  # a batch other than the traced one proves the batch axis is really dynamic
                try:
                    r = agreement(graph, session, torch.rand(b, 3, size, size, generator=gen))
                except Exception as e:  # onnxruntime's errors name the node that failed
                    raise ExportError(f"the ONNX graph of {name!r} fails in onnxruntime at batch {b} (the model's "
                                      f"code may fix the batch size while tracing): {str(e)[:400]}") from e
                result[f"batch {b}"] = {"map_rel": r["map_rel"], "score_rel": r["score_rel"]}
                if not (r["map_rel"] <= TOLERANCE and r["score_rel"] <= TOLERANCE):
                    raise ExportError(f"the ONNX graph of {name!r} does not reproduce the torch path at batch {b}: "
                                      f"max map difference {r['map_rel']:.2e} and score difference "
                                      f"{r['score_rel']:.2e} of their range (allowed {TOLERANCE:.0e}); nothing was "
                                      "written")
        os.replace(tmp_path, out)
    return result
