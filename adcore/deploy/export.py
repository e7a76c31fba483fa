"""``python -m adcore export``: one ONNX graph (or OpenVINO model) from images to (image score, anomaly map), checked
before it is kept.

The graph is :class:`adcore.deploy.postprocess.ScoringGraph` exported with ``torch.onnx.export(dynamo=True)``:
input ``images`` float32 (B, 3, S, S) in [0, 1] with a dynamic batch B, outputs ``score`` (B,) and ``anomaly_map``
(B, S, S), the project's post-processing (bilinear upsample, Gaussian σ = 4, max) inside. The models' fused ops run
their PyTorch references (``ADCORE_BACKEND=torch``): Triton kernels do not export.

The file's metadata (``metadata_props``) carries what a runtime without PyTorch needs: the threshold, the pixel
threshold, the input side and the preprocessing, as JSON under ``adcore``. A model file without a threshold exports
with ``"threshold": null`` and a ``decision`` entry saying so: such a graph gives scores and maps, not decisions.

``--format openvino`` converts that same checked ONNX graph with OpenVINO's own converter (``openvino.convert_model``)
and writes ``DIR/model.xml``, ``DIR/model.bin`` (float32 weights: no FP16 compression) and ``DIR/adcore.json`` (the
same metadata, also in the model's ``rt_info`` under ``adcore``). It is checked like the ONNX file, on OpenVINO's CPU
plugin with f32 inference precision (the plugin would otherwise pick bf16 on CPUs that have it).

Before the file is written, ONNX Runtime runs it on a fixed batch of random images at two batch sizes and its maps
must match the torch path to 1e-4 of their range (and the scores likewise); otherwise nothing is written and the
error gives the numbers.
"""
from __future__ import annotations

import contextlib
import json
import os
import tempfile
import threading
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
    """Run the torch graph and an ONNX Runtime session (or a compiled OpenVINO model) on ``images``; the relative
    differences and both outputs (``*_onnx``: the other runtime's)."""
    with torch.no_grad():
        score_t, map_t = (t.numpy() for t in graph(images))
    score_o, map_o = (np.asarray(a) for a in _outputs(session, images.numpy()))
    map_range = float(map_t.max() - map_t.min()) or 1.0
    score_range = float(score_t.max() - score_t.min()) if len(score_t) > 1 else abs(float(score_t[0]))
    return {"map_rel": float(np.abs(map_o - map_t).max()) / map_range,
            "score_rel": float(np.abs(score_o - score_t).max()) / (score_range or 1.0),
            "score_torch": score_t, "score_onnx": score_o, "map_torch": map_t, "map_onnx": map_o}


def _outputs(session, images: np.ndarray):
    if hasattr(session, "run"):  # onnxruntime.InferenceSession
        return session.run(["score", "anomaly_map"], {"images": images})
    result = session(images)  # an openvino CompiledModel
    return result["score"], result["anomaly_map"]


def check_runtime(graph, session, size: int, name: str, what: str, gen=None) -> dict:
    """Run ``session`` (onnxruntime or OpenVINO) and the torch ``graph`` on random batches of 1 and 3 (a batch other
    than the traced one proves the batch axis is really dynamic); their numbers, or an ExportError."""
    gen = gen if gen is not None else torch.Generator().manual_seed(0)
    result = {}
    for b in (1, 3):
        try:
            with _torch_backend():
                r = agreement(graph, session, torch.rand(b, 3, size, size, generator=gen))
        except Exception as e:  # the runtimes' errors name the node that failed
            raise ExportError(f"{what} of {name!r} fails at batch {b} (the model's code may fix the batch size while "
                              f"tracing): {str(e)[:400]}") from e
        result[f"batch {b}"] = {"map_rel": r["map_rel"], "score_rel": r["score_rel"]}
        if not (r["map_rel"] <= TOLERANCE and r["score_rel"] <= TOLERANCE):
            raise ExportError(f"{what} of {name!r} does not reproduce the torch path at batch {b}: max map difference "
                              f"{r['map_rel']:.2e} and score difference {r['score_rel']:.2e} of their range (allowed "
                              f"{TOLERANCE:.0e}); nothing was written")
    return result


def onnx_session(path):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


_CORE = None
_CORE_LOCK = threading.Lock()


def openvino_core():
    """The process's one ``openvino.Core``, kept for the process's life.

    Why only one: every Core that compiles for the CPU loads a CPU plugin instance of its own, and each instance swaps
    the calling thread's signal stack (``sigaltstack``) for one it maps, saving the previous one; when it is destroyed
    it restores that previous stack if its own is still current, and unmaps its own (OpenVINO's intel_cpu
    ``SigAltStackSetup``). Two instances destroyed oldest first therefore leave the thread on the first one's unmapped
    stack, and the next signal that has a Python handler (CPython installs them with ``SA_ONSTACK``: SIGCHLD from a
    finished subprocess, SIGINT on Ctrl-C) kills the process with SIGSEGV. One Core holds one plugin instance, so the
    stack is set once and stays mapped. ``tests/test_deploy_openvino.py`` compiles twice in a subprocess, frees both
    and sends it a signal (with a Core per compile it died of SIGSEGV).
    """
    global _CORE
    with _CORE_LOCK:
        if _CORE is None:
            import openvino as ov

            _CORE = ov.Core()
        return _CORE


def openvino_compiled(path):
    """A compiled OpenVINO model for ``path`` (``model.xml`` or a folder holding one) on the CPU, in f32."""
    path = Path(path)
    xml = path / "model.xml" if path.is_dir() else path
    return openvino_core().compile_model(str(xml), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})


def export_openvino(model_path, out_dir, *, check: bool = True) -> dict:
    """Export the model file ``model_path`` to the OpenVINO folder ``out_dir`` (model.xml, model.bin, adcore.json)
    through the checked ONNX graph; returns the OpenVINO check's numbers per batch size.

    Raises:
        ExportError: as :func:`export_onnx`, or OpenVINO cannot convert or does not reproduce the torch path.
    """
    from ..artifact import load

    model = load(model_path)
    return export_openvino_model(model, out_dir, model.artifact, check=check)


def export_openvino_model(model, out_dir, meta: dict, *, check: bool = True) -> dict:
    try:
        import openvino as ov
    except ImportError as e:
        raise ExportError("OpenVINO export needs the deploy extra: pip install -e \".[deploy]\"") from e
    from .postprocess import ScoringGraph

    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ExportError(f"--out {str(out_dir)!r} is a file; OpenVINO writes a folder (model.xml, model.bin)")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    name = meta.get("model_name", type(model).__name__)
    size, sigma = meta["preprocessing"]["image_size"], meta["preprocessing"]["sigma"]
    with tempfile.TemporaryDirectory(dir=out_dir.parent, prefix=f".{out_dir.name}.") as tmp:
        onnx_path = Path(tmp) / "model.onnx"
        export_model(model, onnx_path, meta, check=False)  # OpenVINO's check below is the one that matters here
        try:
            ov_model = ov.convert_model(str(onnx_path))
        except Exception as e:
            raise ExportError(f"OpenVINO cannot convert the ONNX graph of {name!r}: {type(e).__name__}: "
                              f"{str(e)[:400]}") from e
        info = json.dumps(_metadata(meta, name), default=list)
        ov_model.set_rt_info(info, ["adcore"])
        staged = Path(tmp) / "openvino"
        staged.mkdir()
        ov.save_model(ov_model, str(staged / "model.xml"), compress_to_fp16=False)
        (staged / "adcore.json").write_text(info + "\n")
        result = {}
        if check:
            graph = ScoringGraph(model, size, sigma).eval()
            compiled = openvino_compiled(staged)
            result = check_runtime(graph, compiled, size, name, "the OpenVINO model")
        if out_dir.exists():
            for f in ("model.xml", "model.bin", "adcore.json"):
                (out_dir / f).unlink(missing_ok=True)
            out_dir.rmdir()  # refuses a folder holding anything else: nothing of the user's is removed
        os.replace(staged, out_dir)
    return result


def _metadata(meta: dict, name: str) -> dict:
    threshold = meta.get("threshold")
    return {
        "adcore_version": meta.get("adcore_version"), "model_name": name,
        "model_params": meta.get("model_params"), "preprocessing": meta["preprocessing"],
        "threshold": None if threshold is None else {k: v for k, v in threshold.items() if k != "holdout_scores"},
        "decision": ("anomalous if score > threshold.value" if threshold is not None else
                     "none: the model file has no threshold, so this graph gives scores and maps only; fit one "
                     "(python -m adcore train) before deciding anything"),
        "inputs": "images: float32 (B, 3, S, S) in [0, 1], RGB",
        "outputs": "score: (B,) image score, anomalous if > threshold.value; anomaly_map: (B, S, S)",
    }


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
        onnx.helper.set_model_props(proto, {"adcore": json.dumps(_metadata(meta, name), default=list)})
        onnx.save(proto, str(tmp_path))
        result = {}
        if check:
            result = check_runtime(graph, onnx_session(tmp_path), size, name, "the ONNX graph", gen)
        os.replace(tmp_path, out)
    return result
