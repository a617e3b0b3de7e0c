"""``fedseg predict`` latency: warm whole-image inference, and the command's start-up.

Run from the repository root::

    OMP_WAIT_POLICY=PASSIVE python -m benchmarks.predict_latency [--image FILE]

(``fedseg predict`` sets that OpenMP policy itself before PyTorch loads; here it must
come from the shell, as this script imports PyTorch first.)

* Warm: :func:`client.inference.predict_classes` on one fundus image (a DRIVE
  image when ``--image`` is given or the retina data sits in ``../shared/data``;
  otherwise random values of the same 3 x 584 x 565 shape), with the network the
  planner gives the retina sites: UNet 16-128, 96 x 96 patches. Weights do not
  change the cost, so the network is freshly initialised.
* Start-up: fresh interpreters timed from the shell's point of view: ``fedseg
  --help``, importing what ``fedseg predict`` needs, and ``fedseg predict`` on that
  one image end to end (checkpoint read, image read, prediction, mask written).

Medians of ``--repeats`` runs after ``--warmup`` untimed ones, with the fastest
(the better estimate on a machine other jobs share) and the load average.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.inferers import sliding_window_inference

from client.data_contract import load_image_for_inference
from client.inference import BLEND_MODE, Tiling, predict_classes
from shared.checkpoint import Checkpoint
from shared.config import ModelSpec
from shared.networks import build_network
from shared.weights import state_to_numpy

RETINA = ModelSpec(channels=(16, 32, 64, 128), in_channels=3, patch_size=(96, 96),
                   normalization="zscore-fov")
FUNDUS_SHAPE = (3, 584, 565)
DEFAULT_IMAGE = Path("../shared/data/retina/DRIVE/imagesTr")
REPO = Path(__file__).resolve().parent.parent


def find_image(given: Path | None) -> Path | None:
    """Return the image to predict: ``given``, else the first DRIVE image if present."""
    if given is not None:
        return given
    found = sorted(DEFAULT_IMAGE.glob("*.png")) if DEFAULT_IMAGE.is_dir() else []
    return found[0] if found else None


def timed(run: Callable[[], object], repeats: int, warmup: int) -> dict[str, Any]:
    """Return the median and fastest of ``repeats`` timed calls, in milliseconds."""
    for _ in range(warmup):
        run()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return {"median_ms": 1e3 * statistics.median(times), "min_ms": 1e3 * min(times),
            "all_ms": [round(1e3 * t, 1) for t in times]}


def count_windows(shape: tuple[int, ...], tiling: Tiling) -> int:
    """Return how many windows the sliding window feeds the network for ``shape``."""
    seen = 0

    def counting(batch: torch.Tensor) -> torch.Tensor:
        nonlocal seen
        seen += batch.shape[0]
        return batch

    sliding_window_inference(torch.zeros(1, 1, *shape), tiling.patch_size, 1, counting,
                             overlap=tiling.overlap, mode=BLEND_MODE)
    return seen


def warm(image_file: Path | None, repeats: int, warmup: int) -> dict[str, Any]:
    """Time :func:`predict_classes` on one fundus image with the retina plan's network."""
    if image_file is not None:
        image, _ = load_image_for_inference(image_file, RETINA.in_channels, 2,
                                            RETINA.normalization)
    else:
        image = np.random.default_rng(0).standard_normal(FUNDUS_SHAPE).astype(np.float32)
    torch.manual_seed(0)
    net = build_network(RETINA).eval()
    tiling = Tiling.of(RETINA)
    cpu = torch.device("cpu")
    return {"image": str(image_file) if image_file else "random", "shape": list(image.shape),
            "windows": count_windows(image.shape[1:], tiling),
            "windows_per_batch": tiling.windows_per_batch,
            **timed(lambda: predict_classes(net, image, tiling, cpu), repeats, warmup)}


def startup(image_file: Path | None, repeats: int) -> dict[str, Any]:
    """Time fresh ``fedseg`` processes: help, predict's imports, predict end to end."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        torch.manual_seed(0)
        model = folder / "final_model.pt"
        Checkpoint(RETINA, state_to_numpy(build_network(RETINA).state_dict()), 1).save(model)
        images = folder / "in"
        images.mkdir()
        if image_file is not None:
            (images / image_file.name).write_bytes(image_file.read_bytes())
        else:
            from PIL import Image

            rgb = np.random.default_rng(0).integers(0, 255, (*FUNDUS_SHAPE[1:], 3), np.uint8)
            Image.fromarray(rgb).save(images / "fundus.png")
        commands = {
            "fedseg --help": ["-m", "fedseg.cli", "--help"],
            "import client.predict": ["-c", "import client.predict"],
            "fedseg predict, 1 image": ["-m", "fedseg.cli", "predict", "--model", str(model),
                                        "--input", str(images), "--output",
                                        str(folder / "out"), "--device", "cpu"],
        }
        results = {}
        for name, args in commands.items():
            def run(args: list[str] = args) -> None:
                subprocess.run([sys.executable, *args], cwd=REPO, env=env, check=True,
                               capture_output=True)
            results[name] = timed(run, repeats, 1)
    return results


def main(argv: list[str] | None = None) -> int:
    """Measure, print the table and write the JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image", type=Path, default=None,
                        help="a fundus image (default: the first DRIVE image, if present)")
    parser.add_argument("--repeats", type=int, default=9, help="timed warm predictions")
    parser.add_argument("--warmup", type=int, default=2, help="untimed warm predictions first")
    parser.add_argument("--startup-repeats", type=int, default=5,
                        help="timed runs of each start-up command")
    parser.add_argument("--threads", type=int, default=0,
                        help="PyTorch CPU threads for the warm part (default: PyTorch's)")
    parser.add_argument("--out", type=Path, default=Path("runs/benchmarks/predict_latency.json"))
    args = parser.parse_args(argv)

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    image_file = find_image(args.image)
    policy = os.environ.get("OMP_WAIT_POLICY", "unset")
    print(f"CPU, {torch.get_num_threads()} threads, OMP_WAIT_POLICY {policy}; load average "
          f"{os.getloadavg()[0]:.1f}", flush=True)
    warm_result = warm(image_file, args.repeats, args.warmup)
    print(f"  warm predict_classes, {warm_result['image']} {warm_result['shape']}, "
          f"{warm_result['windows']} windows of 96x96, {warm_result['windows_per_batch']} "
          f"per forward: median {warm_result['median_ms']:.0f} ms "
          f"(fastest {warm_result['min_ms']:.0f})", flush=True)
    start_results = startup(image_file, args.startup_repeats)
    for name, result in start_results.items():
        print(f"  {name:<24} median {result['median_ms']:6.0f} ms (fastest "
              f"{result['min_ms']:.0f})", flush=True)
    load = os.getloadavg()[0]
    print(f"  load average afterwards {load:.1f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "cpu_count": os.cpu_count(), "threads": torch.get_num_threads(),
        "omp_wait_policy": policy,
        "torch": torch.__version__, "load_average_after": load, "warm": warm_result,
        "startup": start_results,
    }, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
