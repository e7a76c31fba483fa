"""From notebook to inspection line: train on good images, score new ones, export to ONNX or OpenVINO.

* :mod:`.train` — ``python -m adcore train``: recipe training on good images, a held-out threshold, a model file;
* :mod:`.predict` — ``python -m adcore predict``: CSV rows, heat-map overlays and masks for files, folders, globs;
* :mod:`.export` — ``python -m adcore export``: one ONNX graph (or OpenVINO model), checked against the torch path;
* :mod:`.postprocess` — the shared post-processing (upsample, Gaussian σ = 4, max) as a torch module;
* :mod:`.threshold` — the decision threshold from held-out good images (split-conformal, or with a confidence);
* :mod:`.cli` — the three subcommands' arguments.

The model file itself is :mod:`adcore.artifact` (``adcore.save`` / ``adcore.load``).
"""
