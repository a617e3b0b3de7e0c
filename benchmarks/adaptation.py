"""Domain adaptation against the baselines, at the same number of steps per site.

Run from the repository root::

    python -m benchmarks.adaptation --data ../shared/data/retina

Methods: local-only (each site alone), pooled (all training cases in one place, the
non-private upper bound), FedAvg, FedProx and every adaptation mode
(``local-norm``, ``adapter``, ``adapter+local-norm``). Each site takes
``rounds x local-steps`` optimiser steps whatever the method; pooled training takes
the sum over sites. Prints per-site and mean validation Dice in one table, writes
``adaptation.json`` and a PNG of mean Dice per round.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw

from client.config import SiteConfig
from client.trainer import SiteData, SiteTrainer
from server.config import RunConfig
from server.history import MetricsHistory
from simulations.phantoms import write_synthetic_federation
from simulations.simulate import (
    SYNTHETIC_2D,
    SimulationRequest,
    find_site_folders,
    plan_sites,
    run_simulation,
)

FEDERATED: dict[str, dict[str, Any]] = {
    "fedavg": {"strategy": "fedavg"},
    "fedprox": {"strategy": "fedprox", "proximal-mu": 0.01},
    "local-norm": {"adaptation": "local-norm"},
    "adapter": {"adaptation": "adapter"},
    "adapter+local-norm": {"adaptation": "adapter+local-norm"},
}


def centralised(folders: list[Path], config: RunConfig, pooled: bool,
                state_root: Path) -> dict[str, Any]:
    """Train without federation: each site alone, or all sites' cases pooled."""
    sites = [SiteConfig(data_path=f, site_name=f.name, state_dir=state_root / f.name,
                        device="auto", num_threads=2) for f in folders]
    trainers = [SiteTrainer(s, config.model) for s in sites]
    per_round: list[dict[str, float]] = []
    if pooled:
        pool = SiteData(train=tuple(c for t in trainers for c in t.data.train), val=())
        learner = SiteTrainer(sites[0], config.model, data=pool)
        weights = learner.weights()
        for rnd in range(1, config.num_server_rounds + 1):
            plan = replace(config.plan(rnd), local_steps=config.training.local_steps * len(sites))
            weights = learner.train(weights, plan).weights
            per_round.append({t.site.site_name: t.evaluate(weights).dice for t in trainers})
    else:
        weights_by_site = {t.site.site_name: t.weights() for t in trainers}
        for rnd in range(1, config.num_server_rounds + 1):
            scores = {}
            for t in trainers:
                name = t.site.site_name
                weights_by_site[name] = t.train(weights_by_site[name], config.plan(rnd)).weights
                scores[name] = t.evaluate(weights_by_site[name]).dice
            per_round.append(scores)
    return {"per_round": per_round, "final": per_round[-1]}


def federated(data: Path, overrides: dict[str, Any], output: Path) -> dict[str, Any]:
    """Run one federation through Flower and return its per-round, per-site Dice."""
    outcome = run_simulation(SimulationRequest(data=data, output=output, overrides=overrides),
                             echo=lambda line: print("   ", line, flush=True))
    history = MetricsHistory.read(outcome.metrics_json)
    per_round = [{s.site: s.val_dice for s in r.sites if s.val_dice is not None}
                 for r in history.rounds]
    return {"per_round": per_round, "final": per_round[-1], "wall_s": outcome.wall_seconds}


def plot(results: dict[str, dict[str, Any]], path: Path) -> None:
    """Draw mean validation Dice per round for every method into a PNG."""
    width, height, margin = 900, 520, 60
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    rounds = max(len(r["per_round"]) for r in results.values())
    draw.rectangle([margin, margin, width - 220, height - margin], outline="black")
    colours = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2"]

    def xy(i: int, dice: float) -> tuple[float, float]:
        x = margin + (width - 220 - margin) * (i / max(1, rounds - 1))
        return x, height - margin - (height - 2 * margin) * dice

    for tick in range(0, 11, 2):
        _, y = xy(0, tick / 10)
        draw.text((margin - 35, y - 6), f"{tick / 10:.1f}", fill="black")
    for i in range(rounds):
        x, _ = xy(i, 0)
        draw.text((x - 4, height - margin + 8), str(i + 1), fill="black")
    draw.text((margin, 20), "mean validation Dice per round", fill="black")
    for k, (name, result) in enumerate(results.items()):
        colour = colours[k % len(colours)]
        means = [sum(r.values()) / len(r) for r in result["per_round"] if r]
        points = [xy(i, m) for i, m in enumerate(means)]
        if len(points) > 1:
            draw.line(points, fill=colour, width=3)
        y = margin + 20 * k
        draw.line([(width - 205, y + 6), (width - 185, y + 6)], fill=colour, width=3)
        draw.text((width - 180, y), name, fill=colour)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)


def main(argv: list[str] | None = None) -> int:
    """Run every method, print the table, write JSON and the plot."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=None,
                        help="multi-site folder (default: built-in synthetic sites)")
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--local-steps", type=int, default=25)
    parser.add_argument("--methods", nargs="+",
                        default=["local-only", "pooled", *FEDERATED])
    parser.add_argument("--output", type=Path, default=Path("runs/bench-adaptation"))
    args = parser.parse_args(argv)

    if args.data is None:
        args.data = args.output / "synthetic-data"
        write_synthetic_federation(args.data, 3, 24)
        presets = dict(SYNTHETIC_2D)
    else:
        presets = plan_sites(find_site_folders(args.data)).to_run_config()
    folders = find_site_folders(args.data)
    overrides = {**presets, "num-server-rounds": args.rounds, "local-steps": args.local_steps}
    config = RunConfig.from_user_config(overrides)
    results: dict[str, dict[str, Any]] = {}
    for method in args.methods:
        print(f"== {method}", flush=True)
        if method in ("local-only", "pooled"):
            results[method] = centralised(folders, config, method == "pooled",
                                          args.output / f"state-{method}")
        else:
            results[method] = federated(args.data, {**overrides, **FEDERATED[method]},
                                        args.output)

    sites = [f.name for f in folders]
    print(f"\n{'method':<20}" + "".join(f"{s:>10}" for s in sites) + f"{'mean':>8}")
    for method, result in results.items():
        final = result["final"]
        mean = sum(final.values()) / len(final)
        result["mean"] = mean
        print(f"{method:<20}" + "".join(f"{final.get(s, float('nan')):>10.3f}" for s in sites)
              + f"{mean:>8.3f}")
    args.output.mkdir(parents=True, exist_ok=True)
    out = args.output / "adaptation.json"
    out.write_text(json.dumps({"data": str(args.data), "rounds": args.rounds,
                               "local_steps_per_round": args.local_steps,
                               "results": results}, indent=2))
    plot(results, args.output / "adaptation.png")
    print(f"wrote {out} and {args.output / 'adaptation.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
