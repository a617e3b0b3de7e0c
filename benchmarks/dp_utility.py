r"""Dice against epsilon: what DP-SGD leaves of a federation's model, per site, over seeds.

Run from the repository root::

    python -m benchmarks.dp_utility --data ../shared/data/chest-xray --seeds 3 \
        --run-config "initial-model='models/lung.pt' dp-trainable='decoder'" --alone

Every run takes one run config: the plan for these sites under DP-SGD
(:func:`simulations.sites.plan_sites` with the DP site settings, as ``fedseg plan
--site-config`` prints it), then ``--run-config`` on top. So each epsilon, and the
run without DP, takes the same network, starting model, batch, rounds and steps:
only the privacy differs. At each epsilon every site holds the four-key site TOML
of the README (``dp-enabled``, ``dp-target-epsilon`` = ``dp-max-epsilon`` =
epsilon, ``dp-delta``) and calibrates its noise once over the run's rounds;
``inf`` is the same federation without DP. ``--alone`` also trains every site by
itself (a federation of that one site) at every epsilon: what a site gets without
joining. Without ``initial-model`` in the run config, the benchmark starts every
run from the public phantom model ``fedseg simulate`` would pretrain for these sites
under DP-SGD (:func:`simulations.pretrain.public_start`), when a family fits; the
starting model's zero-shot Dice on every site's validation cases comes first.

Seeds ``0..N-1`` set the run config's ``seed``. Validation Dice is the final
round's, per case at full resolution. Writes ``dp-utility.json`` (every run),
``dp-utility.md`` (mean ± standard deviation over seeds) and ``dp-utility.png``
(Dice against epsilon per site) into ``--output``, and prints the Markdown.
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from benchmarks.federation import _json_safe, _mean_std
from benchmarks.pretrain import zero_shot
from fedseg.cli import _parse_overrides
from server.app import initial_weights
from server.config import RunConfig
from server.history import MetricsHistory
from shared.errors import DataError
from shared.planning import make_plan
from simulations.pretrain import public_start
from simulations.simulate import SimulationRequest, run_simulation
from simulations.sites import find_site_folders, site_fingerprints

#: The delta of every run (the README's site TOML).
DELTA = 1e-5
FEDERATED = "federated"
ALONE = "alone"

Row = dict[str, Any]


def site_settings(epsilon: float) -> dict[str, Any]:
    """Return the site TOML's keys for ``epsilon`` (``inf``: no DP, no keys)."""
    if math.isinf(epsilon):
        return {}
    return {"dp-enabled": True, "dp-target-epsilon": epsilon, "dp-max-epsilon": epsilon,
            "dp-delta": DELTA}


def final_sites(history: MetricsHistory) -> dict[str, dict[str, Any]]:
    """Return each site's final-round Dice, validation cases and epsilon."""
    last = history.rounds[-1]
    return {s.site: {"dice": s.val_dice, "cases": s.num_val_cases, "epsilon": s.epsilon}
            for s in last.sites}


def summarise(rows: Sequence[Row], sites: Sequence[str]) -> dict[str, dict[str, Any]]:
    """Reduce the runs over seeds, per setting and epsilon.

    Parameters
    ----------
    rows : sequence of dict
        One per run: ``setting`` (``federated`` or ``alone``), ``epsilon`` (a float,
        ``inf`` without DP), ``seed`` and ``sites`` (site -> ``dice``, ``cases``,
        ``epsilon``; an alone run holds its one site).
    sites : sequence of str
        The sites, in table order.

    Returns
    -------
    dict
        ``"<setting> eps=<epsilon>"`` -> ``setting``, ``epsilon``, ``dice`` (site ->
        mean and std over seeds of its final Dice; ``mean``: of the mean over
        cases), ``spent`` (site -> the largest epsilon it reported) and ``seeds``.
    """
    groups: dict[tuple[str, float], list[Row]] = {}
    for row in rows:
        groups.setdefault((row["setting"], float(row["epsilon"])), []).append(row)
    out: dict[str, dict[str, Any]] = {}
    for (setting, epsilon), runs in sorted(groups.items(), key=lambda g: (g[0][0] != FEDERATED,
                                                                          -g[0][1])):
        dice: dict[str, dict[str, float | None]] = {}
        spent: dict[str, float | None] = {}
        by_seed: dict[int, dict[str, dict[str, Any]]] = {}
        for run in runs:
            by_seed.setdefault(run["seed"], {}).update(run["sites"])
        for site in sites:
            values = [s[site]["dice"] for s in by_seed.values()
                      if site in s and s[site]["dice"] is not None]
            dice[site] = _mean_std(values)
            reported = [s[site]["epsilon"] for s in by_seed.values()
                        if site in s and s[site]["epsilon"] is not None]
            spent[site] = max(reported) if reported else None
        dice["mean"] = _mean_std([_case_mean(s, sites) for s in by_seed.values()])
        label = "inf" if math.isinf(epsilon) else f"{epsilon:g}"
        out[f"{setting} eps={label}"] = {"setting": setting, "epsilon": epsilon, "dice": dice,
                                         "spent": spent, "seeds": sorted(by_seed)}
    return out


def _case_mean(values: Mapping[str, Mapping[str, Any]], sites: Sequence[str]) -> float:
    # Weighted by validation cases, as the simulation's own mean; a site that did
    # not report leaves the mean undefined rather than flattering it.
    pairs = [(values[s]["dice"], values[s]["cases"]) for s in sites if s in values]
    if len(pairs) < len(sites) or any(d is None or not c for d, c in pairs):
        return math.nan
    return float(sum(d * c for d, c in pairs) / sum(c for _, c in pairs))


def markdown(report: Mapping[str, Any]) -> str:
    """Render the summary, the zero-shot row and the run config as Markdown."""
    sites: list[str] = report["sites"]
    lines = [f"# Dice against epsilon: {report['data']}", "",
             f"{len(report['seeds'])} seed(s); delta {DELTA:g}; run config: "
             + " ".join(f"{k}={v}" for k, v in report["run_config"].items()), "",
             "| run | " + " | ".join(sites) + " | mean (cases) |",
             "|---|" + "---|" * (len(sites) + 1)]
    if report.get("zero_shot"):
        cells = [f"{report['zero_shot'][s]['dice']:.3f}" for s in sites]
        lines.append("| starting model, zero-shot | " + " | ".join(cells) + " | |")
    for name, result in report["summary"].items():
        cells = []
        for site in [*sites, "mean"]:
            stats = result["dice"][site]
            if stats["mean"] is None:
                cells.append("n/a")
                continue
            spent = result["spent"].get(site)
            cell = f"{stats['mean']:.3f} ± {stats['std']:.3f}"
            cells.append(cell + ("" if spent is None else f" (eps {spent:.2f})"))
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(report: Mapping[str, Any], path: Path) -> None:
    """Draw each site's Dice against epsilon (no DP at the right, zero-shot dashed)."""
    # Imported here: matplotlib takes a second to load and only the plot needs it.
    from matplotlib.figure import Figure

    sites: list[str] = report["sites"]
    fig = Figure(figsize=(4 * len(sites), 4), dpi=100, layout="constrained")
    axes = fig.subplots(1, len(sites), squeeze=False)[0]
    finite = sorted({r["epsilon"] for r in report["summary"].values()
                     if not math.isinf(r["epsilon"])})
    # No DP sits one step right of the largest epsilon, on the same log axis.
    right = (finite[-1] * 2) if finite else 1.0
    for ax, site in zip(axes, sites, strict=True):
        for setting, marker in ((FEDERATED, "o"), (ALONE, "s")):
            points = sorted((right if math.isinf(r["epsilon"]) else r["epsilon"],
                             r["dice"][site]["mean"], r["dice"][site]["std"])
                            for r in report["summary"].values()
                            if r["setting"] == setting and r["dice"][site]["mean"] is not None)
            if points:
                xs, ys, errs = zip(*points, strict=True)
                ax.errorbar(xs, ys, yerr=errs, marker=marker, capsize=3, label=setting)
        if report.get("zero_shot"):
            ax.axhline(report["zero_shot"][site]["dice"], linestyle="--", color="grey",
                       label="starting model, zero-shot")
        ax.set_xscale("log")
        ax.minorticks_off()
        ax.set_xticks([*finite, right], [*(f"{e:g}" for e in finite), "no DP"])
        ax.set_xlabel("epsilon per site")
        ax.set_ylabel("validation Dice")
        ax.set_title(site)
        ax.grid(alpha=0.3)
    axes[0].legend(loc="lower right")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")


def run_one(data: Path, values: Mapping[str, Any], epsilon: float, output: Path,
            echo: Callable[[str], None]) -> dict[str, dict[str, Any]]:
    """Run one simulation of ``data``'s sites at ``epsilon``; return :func:`final_sites`."""
    outcome = run_simulation(SimulationRequest(data=data, output=output, overrides=values,
                                               site_settings=site_settings(epsilon)),
                             echo=echo)
    return final_sites(MetricsHistory.read(outcome.metrics_json))


def single_site_folders(folders: Sequence[Path], root: Path) -> dict[str, Path]:
    """Return, per site, a federation of that site alone: a folder holding only a link to it."""
    out = {}
    for folder in folders:
        single = root / folder.name
        single.mkdir(parents=True, exist_ok=True)
        link = single / folder.name
        if not link.exists():
            link.symlink_to(folder.resolve(), target_is_directory=True)
        out[folder.name] = single
    return out


def _epsilon(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"epsilon must be positive, got {text}")
    return value


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--data", type=Path, required=True,
                        help="multi-site folder (e.g. ../shared/data/chest-xray)")
    parser.add_argument("--epsilons", type=_epsilon, nargs="+", default=[1.0, 2.0, 4.0, 8.0],
                        help="epsilons per site (default 1 2 4 8); inf, no DP, is always run")
    parser.add_argument("--seeds", type=int, default=3, help="run seeds 0..N-1 (default 3)")
    parser.add_argument("--first-seed", type=int, default=0, metavar="S",
                        help="start at seed S instead: S..S+N-1, e.g. to add seeds to an "
                             "earlier run (default 0)")
    parser.add_argument("--alone", action="store_true",
                        help="also train every site by itself at every epsilon")
    parser.add_argument("--run-config", action="append", default=None,
                        metavar="'KEY=VALUE ...'",
                        help="run-config overrides on top of the private plan, for every run")
    parser.add_argument("--output", type=Path, default=None,
                        help="default: runs/bench-dp-utility/<data folder name>/")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run every epsilon with every seed; write the JSON, Markdown and PNG."""
    parser = _parser()
    args = parser.parse_args(argv)
    if args.seeds < 1:
        parser.error("--seeds must be at least 1")
    if args.first_seed < 0:
        parser.error("--first-seed must be at least 0")
    seeds = list(range(args.first_seed, args.first_seed + args.seeds))
    try:
        folders = find_site_folders(args.data)
    except DataError as exc:
        parser.error(str(exc))
    sites = [f.name for f in folders]
    output: Path = args.output or Path("runs/bench-dp-utility") / args.data.resolve().name
    private = site_fingerprints(folders, site_settings(min(args.epsilons)))
    overrides: dict[str, Any] = _parse_overrides(args.run_config)
    if not RunConfig.from_user_config(overrides).initial_model:
        # What `fedseg simulate` does for these sites under DP-SGD, once for every run.
        output.mkdir(parents=True, exist_ok=True)
        overrides = public_start(private, overrides, output, print)
    # Every epsilon, inf included, runs the private plan.
    values: dict[str, Any] = {**make_plan(private).to_run_config(), **overrides}
    config = RunConfig.from_user_config(values)
    epsilons = sorted({*args.epsilons, math.inf}, reverse=True)

    zero: dict[str, dict[str, float]] = {}
    if config.initial_model:
        print(f"zero-shot Dice of {config.initial_model}", flush=True)
        with tempfile.TemporaryDirectory() as state:
            zero = zero_shot(args.data, config.model, initial_weights(config), 0, Path(state))

    def echo(line: str) -> None:
        print("   ", line, flush=True)

    alone = single_site_folders(folders, output / "single-site") if args.alone else {}
    rows: list[Row] = []
    for seed in seeds:
        seeded = {**values, "seed": seed}
        for epsilon in epsilons:
            label = "inf" if math.isinf(epsilon) else f"{epsilon:g}"
            print(f"== seed {seed}: federated, epsilon {label}", flush=True)
            where = output / "runs" / f"federated-eps-{label}" / f"seed-{seed}"
            rows.append({"setting": FEDERATED, "epsilon": epsilon, "seed": seed,
                         "sites": run_one(args.data, seeded, epsilon, where, echo)})
            if not args.alone:
                continue
            for name, single in alone.items():
                print(f"== seed {seed}: {name} alone, epsilon {label}", flush=True)
                where = output / "runs" / f"alone-eps-{label}" / name / f"seed-{seed}"
                rows.append({"setting": ALONE, "epsilon": epsilon, "seed": seed,
                             "sites": run_one(single, seeded, epsilon, where, echo)})

    report = {"data": str(args.data), "sites": sites, "seeds": seeds,
              "epsilons": epsilons, "run_config": values, "zero_shot": zero,
              "summary": summarise(rows, sites), "runs": rows}
    output.mkdir(parents=True, exist_ok=True)
    (output / "dp-utility.json").write_text(json.dumps(_json_safe(report), indent=2) + "\n")
    text = markdown(report)
    (output / "dp-utility.md").write_text(text)
    plot(report, output / "dp-utility.png")
    print(text)
    print(f"wrote {output / 'dp-utility.json'}, dp-utility.md and dp-utility.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
