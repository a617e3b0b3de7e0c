"""Privacy overheads: DP-SGD step time against plain SGD, and Dice against epsilon.

Run from the repository root::

    python -m benchmarks.privacy --data ../shared/data/retina

Part 1 times a plain and an Opacus DP-SGD step on the same batch, interleaved so
that machine noise hits both alike, and reports their ratio. Part 2 runs the same
federation through Flower without DP and with DP-SGD at several noise multipliers
and reports each site's final validation Dice and cumulative epsilon in one table.
Both parts go into one JSON file.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from monai.losses import DiceCELoss

from server.config import RunConfig
from server.history import MetricsHistory
from shared.networks import build_network
from simulations.simulate import SimulationRequest, run_simulation


def step_times(patch: int, batch: int, channels: str, repeats: int) -> dict[str, float]:
    """Return median seconds of a plain and a DP-SGD step on one fixed batch."""
    from opacus import GradSampleModule
    from opacus.optimizers import DPOptimizer

    spec = RunConfig.from_user_config({"patch-size": f"{patch},{patch}", "in-channels": 3,
                                       "channels": channels}).model
    torch.manual_seed(0)
    images = torch.randn(batch, 3, patch, patch)
    labels = (torch.rand(batch, 1, patch, patch) > 0.9).long()
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    plain = build_network(spec)
    plain_opt = torch.optim.Adam(plain.parameters(), lr=1e-3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        private = GradSampleModule(copy.deepcopy(plain))
        dp_opt = DPOptimizer(torch.optim.Adam(private.parameters(), lr=1e-3),
                             noise_multiplier=1.0, max_grad_norm=1.0, expected_batch_size=batch)

    def plain_step() -> None:
        plain_opt.zero_grad()
        loss_fn(plain(images), labels).backward()
        plain_opt.step()

    def dp_step() -> None:
        dp_opt.zero_grad()
        loss_fn(private(images), labels).backward()
        dp_opt.step()

    timings: dict[str, list[float]] = {"plain": [], "dp": []}
    for i in range(repeats + 2):
        for name, fn in (("plain", plain_step), ("dp", dp_step)):
            start = time.perf_counter()
            fn()
            if i >= 2:  # the first two are warm-up
                timings[name].append(time.perf_counter() - start)
    plain_s = statistics.median(timings["plain"])
    dp_s = statistics.median(timings["dp"])
    return {"plain_step_s": plain_s, "dp_step_s": dp_s, "ratio": dp_s / plain_s,
            "batch": batch, "patch": patch, "repeats": repeats}


def dice_vs_epsilon(data: Path | None, noises: list[float], overrides: dict[str, Any],
                    output: Path) -> list[dict[str, Any]]:
    """Run the federation without DP and at each noise multiplier; return one row per run."""
    rows = []
    for noise in [0.0, *noises]:
        run_overrides = dict(overrides)
        if noise > 0:
            run_overrides.update({"dp": True, "dp-noise-multiplier": noise})
        outcome = run_simulation(SimulationRequest(data=data, output=output,
                                                   overrides=run_overrides),
                                 echo=lambda line: print("   ", line, flush=True))
        final = MetricsHistory.read(outcome.metrics_json).rounds[-1]
        rows.append({
            "noise_multiplier": noise or None,
            "mean_dice": final.mean_val_dice,
            "wall_s": outcome.wall_seconds,
            "sites": {s.site: {"dice": s.val_dice, "epsilon": s.epsilon, "delta": s.delta}
                      for s in final.sites},
        })
    return rows


def main(argv: list[str] | None = None) -> int:
    """Run both parts, print the tables and write the JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=None,
                        help="multi-site folder (default: built-in synthetic sites)")
    parser.add_argument("--noise", type=float, nargs="+", default=[3.0, 1.5, 0.8])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--local-steps", type=int, default=15)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--output", type=Path, default=Path("runs/bench-privacy"))
    args = parser.parse_args(argv)

    print("part 1: step time on one batch (8 x 3 x 96 x 96, UNet 16-128)", flush=True)
    timing = step_times(96, 8, "16,32,64,128", args.repeats)
    print(f"  plain {timing['plain_step_s'] * 1e3:8.1f} ms   DP-SGD "
          f"{timing['dp_step_s'] * 1e3:8.1f} ms   ratio {timing['ratio']:.2f}x", flush=True)

    print("part 2: validation Dice against epsilon (same federation, same steps)", flush=True)
    overrides = {"num-server-rounds": args.rounds, "local-steps": args.local_steps}
    rows = dice_vs_epsilon(args.data, args.noise, overrides, args.output)
    sites = sorted({s for r in rows for s in r["sites"]})
    header = f"  {'noise':>6} " + " ".join(f"{s + ' Dice':>14} {'eps':>7}" for s in sites)
    print(header + f" {'mean Dice':>9}")
    for r in rows:
        cells = []
        for s in sites:
            site = r["sites"].get(s, {})
            eps = site.get("epsilon")
            dice = site.get("dice")
            cells.append(f"{'-' if dice is None else format(dice, '.3f'):>14} "
                         f"{'inf' if eps is None else format(eps, '.2f'):>7}")
        noise = "none" if r["noise_multiplier"] is None else f"{r['noise_multiplier']:.2f}"
        mean = r["mean_dice"]
        print(f"  {noise:>6} " + " ".join(cells)
              + f" {'-' if mean is None else format(mean, '.3f'):>9}")
    args.output.mkdir(parents=True, exist_ok=True)
    out = args.output / "privacy.json"
    out.write_text(json.dumps({"step_time": timing, "dice_vs_epsilon": rows,
                               "data": str(args.data or "synthetic"), "rounds": args.rounds,
                               "local_steps": args.local_steps, "delta": 1e-5}, indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
