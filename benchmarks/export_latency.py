"""Export latency: PyTorch eager, TorchScript and ONNX Runtime on the CPU, side by side.

Run from the repository root::

    python -m benchmarks.export_latency

Each case exports a freshly initialised network with ``fedseg export`` (both
formats) and times whole-input prediction as ``fedseg predict`` does it: MONAI's
sliding window over the model's patch size, with each runtime as the predictor.
Weights do not change the cost, so no trained model is needed. The runtimes are
timed in turn within each repetition, so machine noise hits all three alike; the
table gives the median of ``--repeats`` runs after ``--warmup`` runs, and the fastest
(the better estimate on a machine other jobs share).

* 2D: one fundus-sized RGB image, 1 x 3 x 584 x 565, default 2D UNet (16,32,64,128),
  64 x 64 patches.
* 3D: one volume, 1 x 1 x 96 x 96 x 64, UNet (8,16,32,64), 64 x 64 x 64 patches.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.inferers import sliding_window_inference

from client.inference import BLEND_MODE, Tiling
from fedseg.export import INPUT_NAME, OUTPUT_NAME, ExportRequest, export_model
from shared.checkpoint import Checkpoint
from shared.config import ModelSpec
from shared.networks import build_network
from shared.weights import state_to_numpy

Predictor = Callable[[torch.Tensor], torch.Tensor]
RUNTIMES = ("pytorch", "torchscript", "onnxruntime")


@dataclass(frozen=True)
class Case:
    """One input shape and the network that segments it."""

    name: str
    spec: ModelSpec
    shape: tuple[int, ...]


CASES = (
    Case("2D image", ModelSpec(channels=(16, 32, 64, 128), in_channels=3, patch_size=(64, 64)),
         (1, 3, 584, 565)),
    Case("3D volume", ModelSpec(channels=(8, 16, 32, 64), patch_size=(64, 64, 64)),
         (1, 1, 96, 96, 64)),
)


def predictors(spec: ModelSpec, folder: Path, threads: int) -> dict[str, Predictor]:
    """Export the network of ``spec`` both ways and return one predictor per runtime."""
    import onnxruntime

    torch.manual_seed(0)
    net = build_network(spec).eval()
    model = folder / "final_model.pt"
    Checkpoint(spec, state_to_numpy(net.state_dict()), 0).save(model)
    export_model(ExportRequest(model, folder / "m.pt", "torchscript"))
    export_model(ExportRequest(model, folder / "m.onnx", "onnx"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # TorchScript is deprecated
        scripted = torch.jit.load(str(folder / "m.pt"))
    options = onnxruntime.SessionOptions()
    # The same thread count as PyTorch, so the comparison is of runtimes, not of threads.
    options.intra_op_num_threads = threads
    session = onnxruntime.InferenceSession(str(folder / "m.onnx"), options,
                                           providers=["CPUExecutionProvider"])

    def ort(x: torch.Tensor) -> torch.Tensor:
        (out,) = session.run([OUTPUT_NAME], {INPUT_NAME: x.numpy()})
        return torch.from_numpy(np.asarray(out))

    return {"pytorch": net, "torchscript": scripted, "onnxruntime": ort}


@torch.inference_mode()
def predict(predictor: Predictor, x: torch.Tensor, patch: tuple[int, ...]) -> torch.Tensor:
    """Return the logits of ``x`` as ``fedseg predict`` computes them."""
    tiling = Tiling(patch)
    out = sliding_window_inference(
        x, roi_size=patch, sw_batch_size=tiling.windows_per_batch, predictor=predictor,
        overlap=tiling.overlap, mode=BLEND_MODE)
    assert isinstance(out, torch.Tensor)
    return out


def count_windows(x: torch.Tensor, patch: tuple[int, ...]) -> int:
    """Return how many patches the sliding window feeds the network for ``x``."""
    seen = 0

    def counting(batch: torch.Tensor) -> torch.Tensor:
        nonlocal seen
        seen += batch.shape[0]
        return torch.zeros(batch.shape[0], 1, *batch.shape[2:])

    predict(counting, x, patch)
    return seen


def measure(case: Case, repeats: int, warmup: int, threads: int) -> dict[str, Any]:
    """Time every runtime on ``case``; return medians and the runtimes' agreement."""
    x = torch.randn(case.shape, generator=torch.Generator().manual_seed(0))
    patch = case.spec.patch_size
    with tempfile.TemporaryDirectory() as tmp:
        runs = predictors(case.spec, Path(tmp), threads)
        reference = predict(runs["pytorch"], x, patch)
        diffs = {name: float((predict(run, x, patch) - reference).abs().max())
                 for name, run in runs.items() if name != "pytorch"}
        for _ in range(warmup):
            for run in runs.values():
                predict(run, x, patch)
        times: dict[str, list[float]] = {name: [] for name in runs}
        for _ in range(repeats):
            for name, run in runs.items():
                start = time.perf_counter()
                predict(run, x, patch)
                times[name].append(time.perf_counter() - start)
    return {
        "case": case.name,
        "input_shape": list(case.shape),
        "patch_size": list(patch),
        "windows": count_windows(x, patch),
        "network": {"architecture": case.spec.network, "channels": list(case.spec.channels)},
        "median_ms": {name: 1e3 * statistics.median(t) for name, t in times.items()},
        "min_ms": {name: 1e3 * min(t) for name, t in times.items()},
        "all_ms": {name: [1e3 * s for s in t] for name, t in times.items()},
        "max_abs_diff_vs_pytorch": diffs,
    }


def main(argv: list[str] | None = None) -> int:
    """Measure every case, print the table and write the JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7, help="timed runs per runtime")
    parser.add_argument("--warmup", type=int, default=2, help="untimed runs per runtime first")
    parser.add_argument("--threads", type=int, default=0,
                        help="CPU threads for every runtime (default: PyTorch's default)")
    parser.add_argument("--out", type=Path, default=Path("runs/benchmarks/export_latency.json"))
    args = parser.parse_args(argv)

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    print(f"CPU, {threads} threads per runtime, median of {args.repeats} runs after "
          f"{args.warmup} warm-up runs", flush=True)
    results = []
    for case in CASES:
        print(f"  measuring {case.name} ...", flush=True)
        results.append(measure(case, args.repeats, args.warmup, threads))

    print(f"\n  {'case':<10} {'input':<17} {'windows':>7} "
          + " ".join(f"{name + ' ms':>19}" for name in RUNTIMES))
    for r in results:
        shape = "x".join(str(s) for s in r["input_shape"])
        cells = " ".join(f"{r['median_ms'][name]:>10.0f} ({r['min_ms'][name]:>5.0f})"
                         for name in RUNTIMES)
        print(f"  {r['case']:<10} {shape:<17} {r['windows']:>7} {cells}")
    worst = max(d for r in results for d in r["max_abs_diff_vs_pytorch"].values())
    print("  (median of the timed runs, fastest in brackets)")
    print(f"\n  largest |logit difference| vs PyTorch over both cases: {worst:.1e}")

    import onnxruntime

    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "cpu_count": os.cpu_count(), "threads": threads, "repeats": args.repeats,
        "warmup": args.warmup, "torch": torch.__version__,
        "onnxruntime": onnxruntime.__version__, "cases": results,
    }, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
