"""Loading a site's cases in a fresh process: no disk cache, cold cache, warm cache.

Run from the repository root::

    python -m benchmarks.case_cache --data ../shared/data/chest-xray --site Montgomery

A Flower SuperNode starts a new ClientApp process for every message, so a site's
cases are loaded again in every round unless its disk cache (``<state-dir>/cache``,
:mod:`client.case_cache`) holds them. The settings are those planned from the
sites' data fingerprints (:func:`simulations.sites.plan_sites`). Each repetition
times :meth:`client.trainer.SiteData.load` in three fresh processes, in turn so
that machine noise hits them alike: without a disk cache (as before it existed),
with an empty cache (cold: decode, prepare and write), and with the cache that
filled (warm). Imports are not timed. ``--steps N`` also times N local training
steps (after one untimed step) to put the load beside a round of the planned
``local-steps``; the table then gives the first round over a later one, for a
simulation (the site process keeps its cases after the first round) and for a
deployment (every round a new process).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import client.imaging as imaging
import client.preprocess as preprocess
from client.config import SiteConfig
from client.data_contract import site_split
from client.preprocess import prepared_case
from client.trainer import SiteData, SiteTrainer
from server.config import RunConfig
from simulations.sites import find_site_folders, plan_sites

MODES = ("none", "cold", "warm")


def child(site_dir: Path, state: Path, mode: str, run_config: dict[str, Any],
          steps: int) -> dict[str, Any]:
    """Load a site once in this process and return the timings (the child's side)."""
    config = RunConfig.from_user_config(run_config)
    spec = config.model
    site = SiteConfig(data_path=site_dir, state_dir=state, device="cpu", num_threads=1)
    wall, cpu = time.perf_counter(), time.process_time()
    if mode == "none":
        train, val = site_split(site.data_path, site.patient_pattern, site.val_fraction)
        data = SiteData(train=tuple(prepared_case(r, spec, None, working=True) for r in train),
                        val=tuple(prepared_case(r, spec, None, working=False) for r in val))
    else:
        data = SiteData.load(site, spec)
    result: dict[str, Any] = {
        "load_s": time.perf_counter() - wall, "load_cpu_s": time.process_time() - cpu,
        "decodes": imaging.DECODES, "prepared": preprocess.PREPARED, "cases":
        len(data.train) + len(data.val)}
    if steps:
        trainer = SiteTrainer(site, spec, data=data)
        plan = config.plan(1)
        trainer.train(trainer.weights(), replace(plan, local_steps=1))  # warm-up
        start = time.perf_counter()
        trainer.train(trainer.weights(), replace(plan, local_steps=steps))
        result["step_s"] = (time.perf_counter() - start) / steps
    return result


def _run_child(site_dir: Path, state: Path, mode: str, run_config: dict[str, Any],
               steps: int = 0) -> dict[str, Any]:
    out = subprocess.run(
        [sys.executable, "-m", "benchmarks.case_cache", "--child", mode, "--data",
         str(site_dir), "--state", str(state), "--run-config-json", json.dumps(run_config),
         "--steps", str(steps)], capture_output=True, text=True, check=True)
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def measure(site_dir: Path, run_config: dict[str, Any], repeats: int,
            steps: int) -> dict[str, Any]:
    """Return every run's timings for one site, and their medians and minima."""
    runs: dict[str, list[dict[str, Any]]] = {m: [] for m in MODES}
    with tempfile.TemporaryDirectory(prefix="case-cache-") as tmp:
        state = Path(tmp) / "state"
        for _ in range(repeats):
            runs["none"].append(_run_child(site_dir, Path(tmp) / "unused", "none", run_config))
            shutil.rmtree(state, ignore_errors=True)
            runs["cold"].append(_run_child(site_dir, state, "cold", run_config))
            runs["warm"].append(_run_child(site_dir, state, "warm", run_config))
        step_s = _run_child(site_dir, state, "warm", run_config, steps)["step_s"] if steps else 0
        cache_bytes = sum(p.stat().st_size for p in (state / "cache").rglob("*") if p.is_file())
    summary: dict[str, Any] = {"site": site_dir.name, "runs": runs,
                               "cache_mb": round(cache_bytes / 2**20, 1)}
    for mode in MODES:
        seconds = [r["load_s"] for r in runs[mode]]
        summary[mode] = {"median_s": statistics.median(seconds), "min_s": min(seconds),
                         "cpu_median_s": statistics.median(r["load_cpu_s"] for r in runs[mode])}
    if steps:
        local_steps = RunConfig.from_user_config(run_config).training.local_steps
        round_s = step_s * local_steps
        none, cold, warm = (summary[m]["median_s"] for m in MODES)
        summary["round"] = {"step_s": step_s, "local_steps": local_steps, "train_s": round_s,
                            "simulation_before": (none + round_s) / round_s,
                            "simulation_cached": (warm + round_s) / round_s,
                            "deployment_cached": (cold + round_s) / (warm + round_s)}
    return summary


def _table(summaries: list[dict[str, Any]]) -> list[str]:
    lines = ["| site | cases | no cache (s) | cold cache (s) | warm cache (s) | no cache / warm "
             "| cache (MB) |", "|---|---|---|---|---|---|---|"]
    for s in summaries:
        none, cold, warm = (s[m]["median_s"] for m in MODES)
        lines.append(f"| {s['site']} | {s['runs']['warm'][0]['cases']} | {none:.2f} | "
                     f"{cold:.2f} | {warm:.2f} | {none / warm:.1f}x | {s['cache_mb']} |")
    for s in summaries:
        if "round" in s:
            r = s["round"]
            lines.append(f"{s['site']}: {r['local_steps']} steps x {r['step_s']:.2f} s = "
                         f"{r['train_s']:.0f} s of training per round; first round / later "
                         f"round: simulation {r['simulation_before']:.2f} before the cache, "
                         f"{r['simulation_cached']:.2f} with it; deployment with it "
                         f"{r['deployment_cached']:.2f}")
    return lines


def main(argv: list[str] | None = None) -> None:
    """Parse arguments, time every site (or be one timed child process)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="federation or site folder")
    parser.add_argument("--site", action="append", default=[], help="only these sites")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=0, help="time N training steps as well")
    parser.add_argument("--output", type=Path, help="write the JSON here")
    parser.add_argument("--child", choices=MODES, help=argparse.SUPPRESS)
    parser.add_argument("--state", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--run-config-json", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.data, args.state, args.child,
                               json.loads(args.run_config_json), args.steps)))
        return
    folders = find_site_folders(args.data)
    run_config = plan_sites(folders).to_run_config()
    chosen = [f for f in folders if not args.site or f.name in args.site]
    summaries = [measure(f, run_config, args.repeats, args.steps) for f in chosen]
    for line in _table(summaries):
        print(line)
    if args.output:
        args.output.write_text(json.dumps({"run_config": run_config, "sites": summaries},
                                          indent=2) + "\n")


if __name__ == "__main__":
    main()
