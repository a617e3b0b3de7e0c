"""Privacy's cost in time: one DP-SGD step against one step of plain training.

Run from the repository root::

    python -m benchmarks.privacy

It times one optimiser step of plain training and of DP-SGD on the same
batch for every per-unit gradient mode (:data:`client.private_gradients.GRAD_SAMPLE_MODES`,
plus Opacus's ghost clipping where it applies), on the default 2D network of
``fedseg simulate`` and on the chest plan (UNet 16..256 at 256x256), with one and
with ``dp-augmentations`` patches per patient. Steps are interleaved so that
machine noise hits both alike. Two ratios per mode: against plain training on the
same B*K patches (the cost of DP itself) and against plain training's batch of B
patches (the cost of a round, augmentation multiplicity included). Each mode's
per-unit gradients are compared with ``vmap``'s on the same batch (``max_diff``).
What DP costs in Dice is :mod:`benchmarks.dp_utility`.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from client.losses import patch_losses
from client.private_gradients import (
    GRAD_SAMPLE_MODES,
    PrivateStep,
    expected_hook_warning,
    grad_sample,
    set_grad_sample,
    trainable,
)
from client.trainer import PlainGradient, PrivateGradient
from server.config import RunConfig
from shared.config import TrainPlan
from shared.networks import build_network

NETWORKS = {
    "default-2d": {"patch-size": "64,64", "channels": "16,32,64,128", "in-channels": 1},
    "chest": {"patch-size": "256,256", "channels": "16,32,64,128,256", "in-channels": 1},
}


def _plain_step(net: torch.nn.Module, images: torch.Tensor,
                labels: torch.Tensor) -> Callable[[], None]:
    optimiser = torch.optim.Adam(net.parameters(), lr=1e-3)
    off = torch.amp.GradScaler("cuda", enabled=False)
    gradient = PlainGradient(net, optimiser, _no_autocast, off)

    def step() -> None:
        gradient(images, labels)
        optimiser.step()

    return step


def _no_autocast() -> Any:
    return torch.autocast("cpu", enabled=False)


def _private_step(mode: str, net: torch.nn.Module, images: torch.Tensor,
                  labels: torch.Tensor) -> Callable[[], None]:
    units = images.shape[0]
    optimiser = torch.optim.SGD(trainable(net).values(), lr=1e-3, momentum=0.9)
    private = PrivateStep.wrap(optimiser, noise_multiplier=1.0, max_grad_norm=1.0,
                               expected_units=units, sample_rate=0.1, accountant="rdp")
    gradient = PrivateGradient(GRAD_SAMPLE_MODES[mode](net, _no_autocast), private)

    def step() -> None:
        gradient(images, labels)
        optimiser.step()

    return step


def _ghost_step(net: torch.nn.Module, images: torch.Tensor,
                labels: torch.Tensor) -> Callable[[], None]:
    """Opacus's ghost clipping, one patch per unit only (it clips per-patch norms)."""
    from opacus.grad_sample.utils import wrap_model
    from opacus.optimizers import DPOptimizerFastGradientClipping
    from opacus.utils.fast_gradient_clipping_utils import DPLossFastGradientClipping

    class PerPatch:
        reduction = "mean"

        def __call__(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
            return patch_losses(logits, target)

    model = wrap_model(net, "ghost", loss_reduction="mean", max_grad_norm=1.0)
    optimiser = DPOptimizerFastGradientClipping(
        torch.optim.SGD(net.parameters(), lr=1e-3, momentum=0.9), noise_multiplier=1.0,
        max_grad_norm=1.0, expected_batch_size=images.shape[0], loss_reduction="mean")
    loss = DPLossFastGradientClipping(model, optimiser, PerPatch(), loss_reduction="mean")
    flat_images, flat_labels = images[:, 0], labels[:, 0]

    def step() -> None:
        optimiser.zero_grad()
        with expected_hook_warning():
            loss(model(flat_images), flat_labels).backward()
        optimiser.step()

    return step


def _unit_gradients(mode: str, net: torch.nn.Module, images: torch.Tensor,
                    labels: torch.Tensor) -> dict[str, torch.Tensor]:
    compute = GRAD_SAMPLE_MODES[mode](net, _no_autocast)
    compute(images, labels)
    grads = {n: grad_sample(p).detach().clone() for n, p in trainable(net).items()}
    for p in net.parameters():
        set_grad_sample(p, None)
        p.grad = None
    return grads


def step_times(network: str, batch: int, draws: int, repeats: int,
               modes: list[str]) -> dict[str, Any]:
    """Return median seconds of plain and DP-SGD steps, their ratios and gradient checks.

    Parameters
    ----------
    network : str
        A key of :data:`NETWORKS`.
    batch : int
        Units (patients) per DP batch, and plain training's batch.
    draws : int
        Patches per unit (``dp-augmentations``).
    repeats : int
        Timed steps per variant, after one warm-up step.
    modes : list of str
        Grad-sample modes to time; ``ghost`` only runs with one draw.
    """
    spec = RunConfig.from_user_config(NETWORKS[network]).model
    side = spec.patch_size
    torch.manual_seed(0)
    images = torch.randn(batch, draws, spec.in_channels, *side)
    labels = (torch.rand(batch, draws, 1, *side) > 0.7).long()
    base = build_network(spec)
    reference = _unit_gradients("vmap", copy.deepcopy(base), images, labels)
    variants: dict[str, Callable[[], None]] = {
        "plain B": _plain_step(copy.deepcopy(base), images[:, :1], labels[:, :1]),
        "plain B*K": _plain_step(copy.deepcopy(base), images.flatten(0, 1)[:, None],
                                 labels.flatten(0, 1)[:, None]),
    }
    errors: dict[str, str] = {}
    diffs: dict[str, float] = {}
    for mode in modes:
        try:
            if mode == "ghost":
                if draws > 1:
                    errors[mode] = "per-patch norms only: cannot clip a patient's mean gradient"
                    continue
                variants[mode] = _ghost_step(copy.deepcopy(base), images, labels)
                continue
            got = _unit_gradients(mode, copy.deepcopy(base), images, labels)
            diffs[mode] = max(float((got[n] - reference[n]).abs().max()) for n in reference)
            variants[mode] = _private_step(mode, copy.deepcopy(base), images, labels)
        except Exception as exc:
            errors[mode] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:120]}"
    timings: dict[str, list[float]] = {name: [] for name in variants}
    for i in range(repeats + 1):
        for name, fn in variants.items():
            start = time.perf_counter()
            fn()
            if i >= 1:  # the first is warm-up
                timings[name].append(time.perf_counter() - start)
    median = {name: statistics.median(ts) for name, ts in timings.items()}
    rows: dict[str, dict[str, Any]] = {}
    for mode in modes:
        if mode in median:
            rows[mode] = {"step_s": median[mode],
                          "ratio_equal_patches": median[mode] / median["plain B*K"],
                          "ratio_plain_batch": median[mode] / median["plain B"],
                          "max_diff_vs_vmap": diffs.get(mode)}
        else:
            rows[mode] = {"error": errors.get(mode, "not run")}
    return {"network": network, "batch": batch, "draws": draws, "repeats": repeats,
            "patch": list(side), "channels": list(spec.channels),
            "threads": torch.get_num_threads(), "plain_batch_s": median["plain B"],
            "plain_batch_x_draws_s": median["plain B*K"], "modes": rows}


def print_step_times(result: dict[str, Any]) -> None:
    """Print one network's step-time table."""
    print(f"  {result['network']}: UNet {result['channels']} at "
          f"{'x'.join(map(str, result['patch']))}, {result['batch']} patients x "
          f"{result['draws']} patches, {result['threads']} thread(s); plain "
          f"{result['plain_batch_s'] * 1e3:.0f} ms (B), "
          f"{result['plain_batch_x_draws_s'] * 1e3:.0f} ms (B*K)", flush=True)
    print(f"    {'mode':10} {'DP step':>10} {'/plain B*K':>11} {'/plain B':>9} {'max diff':>9}")
    for mode, row in result["modes"].items():
        if "error" in row:
            print(f"    {mode:10} {row['error']}")
            continue
        diff = row["max_diff_vs_vmap"]
        print(f"    {mode:10} {row['step_s'] * 1e3:8.0f} ms {row['ratio_equal_patches']:10.2f}x "
              f"{row['ratio_plain_batch']:8.2f}x {'-' if diff is None else f'{diff:9.1e}'}",
              flush=True)


def main(argv: list[str] | None = None) -> int:
    """Time every mode on every network, print the tables and write the JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1,
                        help="PyTorch CPU threads while timing (default 1: steadier on a "
                             "shared machine)")
    parser.add_argument("--networks", nargs="+", default=list(NETWORKS), choices=list(NETWORKS))
    parser.add_argument("--modes", nargs="+",
                        default=[*GRAD_SAMPLE_MODES.names(), "ghost"])
    parser.add_argument("--output", type=Path, default=Path("runs/bench-privacy"))
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    draws = TrainPlan().dp_augmentations
    timing = []
    print("step time of DP-SGD against plain training", flush=True)
    for network in args.networks:
        for k in sorted({1, draws}):
            result = step_times(network, 8, k, args.repeats, args.modes)
            print_step_times(result)
            timing.append(result)
    args.output.mkdir(parents=True, exist_ok=True)
    out = args.output / "privacy.json"
    out.write_text(json.dumps({"step_time": timing}, indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
