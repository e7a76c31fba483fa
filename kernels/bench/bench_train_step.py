"""One training step of VT-ADL and ADViT at the paper's shapes, with the fused ops and with the reference ops.

``python -m kernels.bench.bench_train_step [--dry-run]``: 512-px images, 64-px patches (N = 64 tokens, the
single-pass attention forward), D = 512, 8 heads, 6 blocks, K = 150 mixture components, batch 8
(adcore/models/vt_adl.py PAPER_MODEL_PARAMS); forward, backward and optimiser step, timed after two warm-up steps,
in float32 with the models' default TF32 attention dots. VT-ADL's fused op is the MDN likelihood; ADViT adds anomaly
attention. Rows go to the results CSV (provider "fused" or "reference", speedup_vs_eager = reference / fused).
``--dry-run``: a tiny model on CPU through Triton's interpreter (CI).
"""
from __future__ import annotations

import argparse

import torch

from kernels.bench import _common

TINY = dict(image_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2, latent_dim=64, num_components=3,
            decoder_width=16)


def _step_fn(name, backend, params, batch, dev):
    import adcore
    adcore.seed_everything(0)
    model = adcore.create_model(name, **params, backend=backend).to(dev).train()
    stage = model.stages[0]
    optimizer, _ = model.configure_optimizers(stage, 1e-4)
    images = torch.rand(batch, 3, params["image_size"], params["image_size"], device=dev)

    def step():
        optimizer.zero_grad(set_to_none=True)
        loss = model.training_step(images, stage)["loss"]
        loss.backward()
        optimizer.step()
        return loss
    return step


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["vt_adl", "advit"])
    parser.add_argument("--no-csv", action="store_true", help="print only")
    parser.add_argument("--dry-run", action="store_true", help="a tiny model on CPU through the interpreter")
    args = parser.parse_args(argv)
    dev = _common.require_cuda(args.dry_run)
    from adcore.models.vt_adl import PAPER_MODEL_PARAMS
    params = TINY if args.dry_run else dict(PAPER_MODEL_PARAMS, image_size=512)
    batch = 2 if args.dry_run else 8
    rows = []
    for name in args.models:
        times = {}
        for provider, backend in (("fused", "triton"), ("reference", "torch")):
            step = _step_fn(name, backend, params, batch, dev)
            loss = step()
            if not args.dry_run:
                step()  # warm: the autotuners and allocator settle in the first steps
            if not torch.isfinite(loss):
                raise SystemExit(f"{name} {provider}: non-finite loss {loss.item()}")
            times[provider] = (_common.median_ms(step, warmup=0 if args.dry_run else 25), _common.peak_extra_mb(step))
        shape = f"image={params['image_size']},patch={params['patch_size']},D={params['embed_dim']},B={batch}"
        for provider, (ms, mem) in times.items():
            speedup = times["reference"][0] / ms
            rows.append(dict(kernel=f"train_step_{name}", provider=provider, mode="fwd_bwd_step", shape=shape,
                             dtype="fp32", median_ms=ms, speedup_vs_eager=speedup, peak_mem_mb=mem))
            print(f"{name:8s} {provider:10s} {ms:10.2f} ms  x{speedup:.2f} vs reference"
                  + ("" if mem is None else f"  {mem:9.1f} MB"), flush=True)
    if not args.no_csv:
        _common.append_rows(rows)
        print(f"appended {len(rows)} rows to {_common.RESULTS_CSV}")


if __name__ == "__main__":
    main()
