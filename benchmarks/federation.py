"""Every method on the same sites, at equal steps per site, over several seeds.

Run from the repository root::

    python -m benchmarks.federation --data ../shared/data/retina --seeds 3

Methods: local-only (each site alone), pooled (all training cases in one place,
the centralised upper bound), FedAvg, FedProx, every site-local mode of
:data:`shared.partition.ADAPTATIONS` (FedAvg with those layers kept at the site,
the local head included) and every personalisation mode of
:data:`shared.personalization.PERSONALIZATIONS` (FedAvg, each site deploying its
personal model). All of them train with the settings planned from the sites' data
fingerprints (:func:`simulations.sites.plan_sites`), and each site takes
``rounds x local-steps`` optimiser steps whatever the method; pooled training
takes the sum over sites. Ditto trains two models, so each gets half the local
steps (``2 x floor(local-steps / 2)`` per round in all); local fine-tuning takes
its ``finetune-steps`` out of the budget in whole rounds (the federation runs
``rounds - ceil(finetune-steps / local-steps)`` rounds), as the report states
beside the budget. Seeds ``0..N-1`` set the run config's ``seed``
(initial weights, and mixed with each site's seed and the round into its local
training).

Validation Dice is measured at full resolution on each site's held-out cases. The
command writes ``federation.json`` (everything, per seed, round and site),
``federation.md`` (mean ± standard deviation over seeds per site, differences
from local-only and pooled, the cross-site tables) and ``federation.png`` (mean
Dice per round per method) after every seed, so a long run stopped early keeps
the seeds it finished, and prints the Markdown at the end.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from client.config import SiteConfig
from client.trainer import SiteData, SiteTrainer
from fedseg.cli import _parse_overrides
from server.app import initial_weights
from server.config import RunConfig
from server.history import MetricsHistory
from shared.config import TrainPlan
from shared.errors import ConfigError, DataError
from shared.partition import ADAPTATIONS
from shared.personalization import FINETUNE_ROUNDS, PERSONALIZATIONS
from shared.planning import Plan
from shared.run_files import RunFiles
from shared.settings import to_keys
from shared.weights import NDArrays
from simulations.cross_site import Predictor, cross_site_matrix
from simulations.phantoms import write_synthetic_federation
from simulations.simulate import SYNTHETIC_2D, SimulationRequest, run_simulation
from simulations.sites import find_site_folders, plan_sites

LOCAL_ONLY = "local-only"
POOLED = "pooled"
CENTRALISED = (LOCAL_ONLY, POOLED)

#: Run-config overrides of each federated method. Every site-local mode and every
#: personalisation mode of the registries is one method, so a mode added there is
#: benchmarked without an edit here.
FEDERATED: dict[str, dict[str, Any]] = {
    "fedavg": {"strategy": "fedavg"},
    "fedprox": {"strategy": "fedprox"},
    **{mode: {"strategy": "fedavg", "adaptation": mode} for mode in ADAPTATIONS
       if mode != "none"},
    **{mode: {"strategy": "fedavg", "personalization": mode} for mode in PERSONALIZATIONS
       if mode != "none"},
}
METHODS: tuple[str, ...] = (*CENTRALISED, *FEDERATED)

#: Acceptance of issue 10: the best federated method may trail pooled training by this.
POOLED_MARGIN = 0.01


def plan_budget(plan: Plan, rounds: int | None = None,
                local_steps: int | None = None) -> dict[str, Any]:
    """Return the plan's run config as every method's budget.

    The plan takes its deployed fine-tune out of its rounds; here they go back
    (:attr:`Plan.budget_rounds`), so each method (the fine-tuning one included,
    which takes them out again) gets the plan's steps per site. Each method names
    what its sites deploy, so the plan's choice becomes one of them.

    ``rounds`` and ``local_steps`` (``--rounds``, ``--local-steps``) replace the
    budget's; the fine-tune keeps the plan's share of it (:meth:`Plan.finetune_rounds`),
    so a quick budget of 6 retina rounds fine-tunes one round, not the plan's five.
    """
    budget = plan.budget_rounds if rounds is None else rounds
    steps = plan.local_steps if local_steps is None else local_steps
    return {**plan.to_run_config(), "num-server-rounds": budget, "local-steps": steps,
            "finetune-steps": plan.finetune_rounds(budget, budget=True) * steps,
            "personalization": "none"}


def _personalization(method: str) -> str:
    return str(FEDERATED.get(method, {}).get("personalization", "none"))


def _finetune_plan(method: str, values: Mapping[str, Any]) -> TrainPlan | None:
    """Return the training settings of a fine-tuning ``method`` (``None``: it does not)."""
    if not PERSONALIZATIONS[_personalization(method)].finetunes:
        return None
    return RunConfig.from_user_config({**values, **FEDERATED[method]}).training


def finetune_steps(method: str, values: Mapping[str, Any]) -> int:
    """Return the fine-tuning steps ``method`` gives the deployed model (0: it does not)."""
    training = _finetune_plan(method, values)
    return 0 if training is None else training.finetune_length(training.local_steps)


def method_rounds(method: str, values: Mapping[str, Any], rounds: int, local_steps: int) -> int:
    """Return the federated rounds of ``method`` within a budget of ``rounds x local_steps``.

    A fine-tune's steps come out of the budget: it takes whole rounds, so the
    federation runs ``rounds - ceil(finetune-steps / local-steps)`` of them.
    """
    return rounds - math.ceil(finetune_steps(method, values) / local_steps)


def method_values(method: str, values: Mapping[str, Any], rounds: int,
                  local_steps: int) -> dict[str, Any]:
    """Return the run config of federated ``method``: ``values`` with its overrides.

    A method that trains a personal model beside the global one (Ditto) gets half
    the local steps for each, and a fine-tuning one fewer rounds
    (:func:`method_rounds`), so that the site's optimiser steps stay the budget's.
    """
    out = {**values, **FEDERATED[method]}
    if PERSONALIZATIONS[_personalization(method)].trains_personal:
        out["local-steps"] = local_steps // 2
    if finetune_steps(method, values):
        out["num-server-rounds"] = method_rounds(method, values, rounds, local_steps)
    return out


def method_steps(method: str, values: Mapping[str, Any], rounds: int, local_steps: int) -> int:
    """Return the optimiser steps each site's training rounds take in ``method``.

    What the metrics history counts: without a fine-tune's steps, with both of
    Ditto's models.
    """
    if PERSONALIZATIONS[_personalization(method)].trains_personal:
        return rounds * 2 * (local_steps // 2)
    return method_rounds(method, values, rounds, local_steps) * local_steps


def budget_notes(methods: Sequence[str], values: Mapping[str, Any], rounds: int,
                 local_steps: int) -> dict[str, str]:
    """Return, per method whose steps differ from the plain budget, how they are spent."""
    notes = {}
    for method in methods:
        mode = PERSONALIZATIONS[_personalization(method)]
        trained = method_steps(method, values, rounds, local_steps)
        if mode.trains_personal:
            half = local_steps // 2
            odd = " (one fewer per round than the others: local-steps is odd)" \
                if local_steps % 2 else ""
            notes[method] = (f"each round {half} steps of the global model + {half} of the "
                             f"personal one = {trained} steps per site{odd}")
        elif (training := _finetune_plan(method, values)) is not None:
            steps = finetune_steps(method, values)
            when = ("each evaluation (the last one is deployed)"
                    if FINETUNE_ROUNDS[training.finetune_rounds].every_round
                    else "the last evaluation")
            notes[method] = (f"{method_rounds(method, values, rounds, local_steps)} rounds "
                             f"({trained} steps), then {steps} fine-tuning steps of a copy of "
                             f"the global model before {when}: the deployed model has had "
                             f"{trained + steps} steps")
    return notes


@dataclass(frozen=True)
class MethodRun:
    """One method trained with one seed.

    Attributes
    ----------
    per_round : list of dict
        Validation Dice per site after each round (a site that did not report is
        absent).
    steps : dict of str to int
        Optimiser steps each trainer took over the whole run: per site, or
        ``pooled`` for the pooled learner.
    cross_site : dict
        The method's models on every site's validation cases, in the format of
        :func:`simulations.cross_site.cross_site_matrix`.
    wall_s : float
        Wall-clock seconds of training and evaluation.
    """

    per_round: list[dict[str, float]]
    steps: dict[str, int]
    cross_site: dict[str, Any]
    wall_s: float


@dataclass(frozen=True)
class AloneRun:
    """One site trained alone: Dice after each round, steps taken, final weights."""

    dice: list[float]
    steps: int
    weights: NDArrays


def train_rounds(learner: SiteTrainer, config: RunConfig, start: NDArrays,
                 judges: Sequence[SiteTrainer], share: int = 1
                 ) -> tuple[list[dict[str, float]], int, NDArrays]:
    """Train ``learner`` from ``start`` for the run's rounds, scoring every round.

    Parameters
    ----------
    learner : SiteTrainer
        One site alone, or the pooled learner.
    config : RunConfig
        The run config the federated methods get.
    start : NDArrays
        The initial weights.
    judges : sequence of SiteTrainer
        The sites whose validation cases score the model after each round, as the
        federated methods are scored: one pass before the last round, the deployed
        prediction (test-time flips) after it.
    share : int
        Multiple of the run's local steps the learner takes each round (pooled:
        the number of sites).

    Returns
    -------
    tuple
        Dice per round per judge, steps taken, final weights.
    """
    weights, steps, dice = start, 0, []
    for rnd in range(1, config.num_server_rounds + 1):
        plan = config.plan(rnd)
        plan = replace(plan, local_steps=plan.local_steps * share)
        result = learner.train(weights, plan)
        # A reply holds only the dp-trainable group; the rest keeps its values.
        weights, steps = {**weights, **result.weights}, steps + result.steps
        dice.append({j.site.site_name: j.evaluate(weights, plan).dice for j in judges})
    return dice, steps, weights


def train_alone(site: SiteConfig, config: RunConfig, start: NDArrays) -> AloneRun:
    """Train one site alone from ``start`` for the run's rounds (in its own process)."""
    trainer = SiteTrainer(site, config.model)
    dice, steps, weights = train_rounds(trainer, config, start, [trainer])
    return AloneRun([d[site.site_name] for d in dice], steps, weights)


def centralised(folders: Sequence[Path], config: RunConfig, pooled: bool,
                state_root: Path) -> MethodRun:
    """Train without federation: each site alone, or one learner on all sites' cases.

    Parameters
    ----------
    folders : sequence of pathlib.Path
        The site folders.
    config : RunConfig
        The same run config the federated methods get (rounds, steps, schedule, seed).
    pooled : bool
        Pool every site's training cases into one learner, which takes the sum of
        the sites' steps each round; otherwise each site trains its own model.
    state_root : pathlib.Path
        Where the trainers' state folders go.

    Returns
    -------
    MethodRun
        Dice per round on each site's validation cases, steps taken, and the
        cross-site matrix of the final models.
    """
    started = time.monotonic()
    # Site seeds as the simulation numbers its sites, so local training draws the
    # same patches as the site would in a federation with this seed; one thread each,
    # as a simulated site has.
    sites = [SiteConfig(data_path=f, site_name=f.name, state_dir=state_root / f.name,
                        device="auto", seed=i, num_threads=1) for i, f in enumerate(folders)]
    trainers = [SiteTrainer(s, config.model) for s in sites]
    data = {t.site.site_name: t.data for t in trainers}
    start = initial_weights(config)
    per_round: list[dict[str, float]] = []
    models: list[tuple[str, Predictor]] = []
    if pooled:
        pool = SiteData(train=tuple(c for t in trainers for c in t.data.train), val=())
        learner = SiteTrainer(replace(sites[0], site_name=POOLED, state_dir=state_root / POOLED,
                                      num_threads=0), config.model, data=pool)
        per_round, taken, weights = train_rounds(learner, config, start, trainers,
                                                 share=len(sites))
        steps = {POOLED: taken}
        models.append((POOLED, partial(learner.predict, weights)))
    else:
        # Sites train alone side by side, one process each, as simulated sites do: in
        # one process they took turns and left cores idle (chest X-ray: 2 sites, 2 cores).
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(max_workers=len(sites), mp_context=context) as executor:
            alone = list(executor.map(train_alone, sites, [config] * len(sites),
                                      [start] * len(sites)))
        per_round = [{s.site_name: run.dice[i] for s, run in zip(sites, alone, strict=True)}
                     for i in range(config.num_server_rounds)]
        steps = {s.site_name: run.steps for s, run in zip(sites, alone, strict=True)}
        # Each site's own model is one column: how far a model trained alone travels.
        models.extend((f"{t.site.site_name} local", partial(t.predict, run.weights))
                      for t, run in zip(trainers, alone, strict=True))
    cross = cross_site_matrix(models, data, config.model.num_classes)
    return MethodRun(per_round, steps, cross, time.monotonic() - started)


def federated(data: Path, values: Mapping[str, Any], output: Path,
              echo: Callable[[str], None]) -> MethodRun:
    """Run one federation through Flower and collect its Dice, steps and cross-site matrix.

    Parameters
    ----------
    data : pathlib.Path
        The multi-site folder.
    values : mapping
        Run-config values with every planned key set, so the run plans nothing itself.
    output : pathlib.Path
        Folder the run folder is created in.
    echo : callable
        Receives the simulation's progress lines.

    Returns
    -------
    MethodRun
        Dice per round from the sites' own evaluation, steps from the metrics
        history, and the run's ``cross-site.json``.
    """
    outcome = run_simulation(SimulationRequest(data=data, output=output, overrides=values),
                             echo=echo)
    history = MetricsHistory.read(outcome.metrics_json)
    per_round = [{s.site: s.val_dice for s in r.sites if s.val_dice is not None}
                 for r in history.rounds]
    steps: dict[str, int] = {}
    for rnd in history.rounds:
        for s in rnd.sites:
            steps[s.site] = steps.get(s.site, 0) + (s.train_steps or 0)
    cross = json.loads(RunFiles(outcome.run_dir).cross_site_json.read_text())
    return MethodRun(per_round, steps, cross, outcome.wall_seconds)


def _mean_std(values: Sequence[float]) -> dict[str, float | None]:
    """Return the mean and the sample standard deviation (0 for one value) of finite values."""
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return {"mean": None, "std": None}
    std = float(np.std(finite, ddof=1)) if len(finite) > 1 else 0.0
    return {"mean": float(np.mean(finite)), "std": std}


def _mean_matrix(matrices: Sequence[Sequence[Sequence[float | None]]]
                 ) -> list[list[float | None]]:
    """Return the element-wise mean over seeds of matrices with ``None`` holes."""
    stacked = np.array([[[math.nan if v is None else v for v in row] for row in m]
                        for m in matrices], dtype=float)
    finite = np.isfinite(stacked)
    counts = finite.sum(axis=0)
    sums = np.where(finite, stacked, 0.0).sum(axis=0)
    return [[float(s / c) if c else None for s, c in zip(srow, crow, strict=True)]
            for srow, crow in zip(sums, counts, strict=True)]


def _final(run: MethodRun, sites: Sequence[str]) -> list[float]:
    last = run.per_round[-1] if run.per_round else {}
    return [last.get(s, math.nan) for s in sites]


def _site_mean(values: Sequence[float]) -> float:
    # A site that did not report makes the mean over sites undefined, not smaller.
    return float(np.mean(values)) if values else math.nan


def summarise(runs: Mapping[str, Sequence[MethodRun]], sites: Sequence[str]
              ) -> dict[str, dict[str, Any]]:
    """Reduce each method's runs over seeds.

    Returns
    -------
    dict
        Per method: ``dice`` (per site and ``mean`` over sites: ``mean`` and
        ``std`` over seeds of the final round's Dice), ``per_round`` (mean over
        sites, then mean and std over seeds), ``vs_local_only`` and ``vs_pooled``
        (per site and mean: difference of the means over seeds; absent without
        that baseline), ``cross_site`` (matrices averaged over seeds) and
        ``steps`` (per trainer, each seed's, which are equal by construction).
    """
    summary: dict[str, dict[str, Any]] = {}
    for method, seed_runs in runs.items():
        finals = [_final(r, sites) for r in seed_runs]
        dice = {site: _mean_std([f[k] for f in finals]) for k, site in enumerate(sites)}
        dice["mean"] = _mean_std([_site_mean(f) for f in finals])
        curves = [[_site_mean([r.get(s, math.nan) for s in sites]) for r in run.per_round]
                  for run in seed_runs]
        by_round = [_mean_std([c[i] for c in curves if i < len(c)])
                    for i in range(max(map(len, curves)))]
        cross = {"sites": seed_runs[0].cross_site["sites"],
                 "models": seed_runs[0].cross_site["models"],
                 **{key: _mean_matrix([r.cross_site[key] for r in seed_runs])
                    for key in ("dice", "hd95", "asd")}}
        summary[method] = {
            "dice": dice,
            "per_round": {"mean": [r["mean"] for r in by_round],
                          "std": [r["std"] for r in by_round]},
            "cross_site": cross,
            "steps": [r.steps for r in seed_runs],
        }
    for baseline, key in ((LOCAL_ONLY, "vs_local_only"), (POOLED, "vs_pooled")):
        if baseline not in summary:
            continue
        base = summary[baseline]["dice"]
        for result in summary.values():
            result[key] = {
                column: (None if cell["mean"] is None or base[column]["mean"] is None
                         else cell["mean"] - base[column]["mean"])
                for column, cell in result["dice"].items()}
    return summary


def acceptance(summary: Mapping[str, Mapping[str, Any]], sites: Sequence[str]
               ) -> dict[str, Any] | None:
    """Check issue 10's criterion on the best federated method (highest mean over sites).

    It must reach local-only's mean Dice on every site, and pooled training's mean
    over sites minus :data:`POOLED_MARGIN`. ``None`` without a federated method or
    either baseline.
    """
    candidates = {m: r["dice"]["mean"]["mean"] for m, r in summary.items()
                  if m in FEDERATED and r["dice"]["mean"]["mean"] is not None}
    if not candidates or LOCAL_ONLY not in summary or POOLED not in summary:
        return None
    best = max(candidates, key=lambda m: candidates[m])
    gaps = summary[best]["vs_local_only"]
    pooled_gap = summary[best]["vs_pooled"]["mean"]
    return {
        "best_federated": best,
        "at_least_local_only_on_every_site": all(
            gaps[s] is not None and gaps[s] >= 0 for s in sites),
        "within_pooled_margin": pooled_gap is not None and pooled_gap >= -POOLED_MARGIN,
        "pooled_margin": POOLED_MARGIN,
    }


def _cell(stats: Mapping[str, float | None]) -> str:
    if stats["mean"] is None or stats["std"] is None:
        return "n/a"
    return f"{stats['mean']:.3f} ± {stats['std']:.3f}"


def _signed(value: float | None) -> str:
    if value is None:
        return "n/a"
    # Adding 0.0 turns a rounded -0.0 into 0.0, so a tie never reads as trailing.
    return f"{round(value, 3) + 0.0:+.3f}"


def _row(cells: Sequence[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def markdown(report: Mapping[str, Any]) -> str:
    """Return the benchmark's Markdown: Dice table, differences, acceptance, cross-site tables."""
    sites: list[str] = report["sites"]
    summary: dict[str, dict[str, Any]] = report["summary"]
    budget = report["budget"]
    notes: dict[str, str] = report.get("budget_notes", {})
    seeds = len(report["seeds"])
    columns = [*sites, "mean"]
    lines = [
        f"# Federated benchmark: {report['data']}", "",
        f"{seeds} seed{'s' if seeds != 1 else ''}; every site takes {budget['rounds']} x "
        f"{budget['local_steps']} (rounds x local steps) = {budget['steps_per_site']} optimiser "
        f"steps in every method (pooled: {budget['pooled_steps']} on the pooled cases); equal "
        f"steps checked: {'yes' if report['equal_steps'] else 'NO'}.", "",
        *[f"- {method}: {note}" for method, note in notes.items()],
        *([""] if notes else []),
        "## Validation Dice (final round, full resolution; mean ± std over seeds)", "",
        _row(["method", *columns]), _row(["---"] * (len(columns) + 1)),
    ]
    lines += [_row([m, *(_cell(r["dice"][c]) for c in columns)]) for m, r in summary.items()]
    if LOCAL_ONLY in summary or POOLED in summary:
        lines += ["", "## Difference from local-only / pooled (mean over seeds; + is better)", "",
                  _row(["method", *columns]), _row(["---"] * (len(columns) + 1))]
        for method, result in summary.items():
            cells = [" / ".join(_signed(result[key][c]) for key in ("vs_local_only", "vs_pooled")
                                if key in result) for c in columns]
            lines.append(_row([method, *cells]))
        which = " / ".join(name for name in CENTRALISED if name in summary)
        lines += ["", f"Cells: difference from {which}."]
    verdict = report.get("acceptance")
    if verdict:
        lines += ["", "## Acceptance (issue 10)", "",
                  f"Best federated method: {verdict['best_federated']}; at least local-only on "
                  f"every site: {'yes' if verdict['at_least_local_only_on_every_site'] else 'no'}"
                  f"; mean over sites at least pooled - {verdict['pooled_margin']}: "
                  f"{'yes' if verdict['within_pooled_margin'] else 'no'}."]
    lines += ["", "## Cross-site Dice (mean over seeds)", "",
              "Each method's models (rows) on every site's validation cases (columns)."]
    for method, result in summary.items():
        cross = result["cross_site"]
        lines += ["", f"### {method}", "", _row(["model", *cross["sites"]]),
                  _row(["---"] * (len(cross["sites"]) + 1))]
        for j, model in enumerate(cross["models"]):
            cells = ["n/a" if row[j] is None else f"{row[j]:.3f}" for row in cross["dice"]]
            lines.append(_row([model, *cells]))
    return "\n".join(lines) + "\n"


def plot(summary: Mapping[str, Mapping[str, Any]], path: Path) -> None:
    """Draw mean Dice over sites per round per method (mean over seeds, shaded std)."""
    # Imported here: matplotlib takes a second to load and only the plot needs it.
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    # A bare Figure renders with Agg and touches no global pyplot state or display.
    fig = Figure(figsize=(9, 5), dpi=100, layout="constrained")
    ax = fig.add_subplot()
    for method, result in summary.items():
        mean = np.array([math.nan if v is None else v for v in result["per_round"]["mean"]])
        std = np.array([math.nan if v is None else v for v in result["per_round"]["std"]])
        rounds = np.arange(1, len(mean) + 1)
        (line,) = ax.plot(rounds, mean, marker="o", markersize=3, label=method)
        ax.fill_between(rounds, mean - std, mean + std, color=line.get_color(), alpha=0.15)
    ax.set_xlabel("round")
    ax.set_ylabel("validation Dice, mean over sites")
    ax.set_title("Dice per round (mean over seeds, shaded: ± std)")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")


def _json_safe(value: Any) -> Any:
    """Replace NaN and infinities by ``None``: strict JSON has no such numbers."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    return value


def _parsed(values: Mapping[str, Any]) -> dict[str, Any] | None:
    """Return a run config as parsed (``None``: not one).

    A report written before a key was added (it has its default) still matches.
    """
    try:
        return to_keys(RunConfig.from_user_config(values))
    except ConfigError:
        return None


def finished_runs(path: Path, values: Mapping[str, Any], sites: Sequence[str],
                  methods: Sequence[str]) -> dict[str, list[MethodRun]]:
    """Return the runs of ``methods`` that an earlier report at ``path`` holds.

    A long benchmark writes its report after every seed; ``--resume`` keeps those
    seeds and runs only the rest. Only a report of the same sites and run config
    qualifies, so every kept run had the budget the new ones get.

    Raises
    ------
    DataError
        The report is unreadable, or of other sites or another run config.
    """
    try:
        report = json.loads(path.read_text())
        same = report["sites"] == list(sites) and _parsed(report["run_config"]) == _parsed(values)
        kept = {m: [MethodRun([{k: math.nan if v is None else float(v) for k, v in r.items()}
                               for r in run["per_round"]], dict(run["steps"]),
                              dict(run["cross_site"]), float(run["wall_s"]))
                    for run in report["runs"].get(m, [])] for m in methods}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise DataError(path, f"is not a benchmark report ({type(exc).__name__})",
                        "choose another --output or drop --resume") from exc
    if not same:
        raise DataError(path, "is a report of other sites or another run config",
                        "choose another --output or drop --resume")
    return kept


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--data", type=Path, default=None,
                        help="multi-site folder (default: built-in synthetic sites)")
    parser.add_argument("--seeds", type=int, default=3, help="run seeds 0..N-1 (default 3)")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS),
                        metavar="METHOD", help=f"any of {', '.join(METHODS)} (default: all)")
    parser.add_argument("--rounds", type=int, default=None,
                        help="override the planned budget in rounds (the fine-tune keeps "
                             "its planned share)")
    parser.add_argument("--local-steps", type=int, default=None,
                        help="override the planned optimiser steps per site per round")
    parser.add_argument("--run-config", action="append", default=None,
                        metavar="'KEY=VALUE ...'",
                        help="further run-config overrides (e.g. \"channels='8,16'\"), "
                             "applied to every method")
    parser.add_argument("--synthetic-sites", type=int, default=3)
    parser.add_argument("--synthetic-cases", type=int, default=24)
    parser.add_argument("--synthetic-size", type=int, default=96)
    parser.add_argument("--output", type=Path, default=None,
                        help="default: runs/bench-federation/<data folder name>/")
    parser.add_argument("--resume", action="store_true",
                        help="keep the seeds federation.json in the output folder already holds "
                             "(same sites and run config) and run only the others")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run every method with every seed; write the JSON, Markdown and PNG; print the Markdown."""
    parser = _parser()
    args = parser.parse_args(argv)
    if args.seeds < 1:
        parser.error("--seeds must be at least 1")
    name = args.data.resolve().name if args.data is not None else "synthetic"
    output: Path = args.output or Path("runs/bench-federation") / name
    # Bad input (a missing folder, a bad override) is one line, as in fedseg's CLI.
    try:
        if args.data is None:
            data = output / "synthetic-data"
            write_synthetic_federation(data, args.synthetic_sites, args.synthetic_cases,
                                       shape=(args.synthetic_size,) * 2)
            # The preset the simulation uses for its synthetic task: minutes on a CPU.
            planned = dict(SYNTHETIC_2D)
        else:
            data = args.data
            planned = plan_budget(plan_sites(find_site_folders(data)), args.rounds,
                                  args.local_steps)
        folders = find_site_folders(data)
        sites = [f.name for f in folders]
        values: dict[str, Any] = {**planned, **_parse_overrides(args.run_config)}
        if args.rounds is not None:
            values["num-server-rounds"] = args.rounds
        if args.local_steps is not None:
            values["local-steps"] = args.local_steps
        config = RunConfig.from_user_config(values)
    except (DataError, ConfigError) as exc:
        parser.error(str(exc))
    rounds, local_steps = config.num_server_rounds, config.training.local_steps
    if local_steps < 1:
        parser.error("equal steps per site need local-steps >= 1 (local-epochs vary with "
                     "a site's size)")
    short = [m for m in args.methods if m not in CENTRALISED
             and method_rounds(m, values, rounds, local_steps) < 1]
    if short:
        parser.error(f"{short[0]} takes its fine-tuning steps out of the budget of "
                     f"{rounds} rounds and leaves no round to federate: raise --rounds")
    if local_steps < 2 and any(PERSONALIZATIONS[_personalization(m)].trains_personal
                               for m in args.methods):
        parser.error("ditto splits each round's local steps between its two models: it needs "
                     "local-steps >= 2")

    runs: dict[str, list[MethodRun]] = {m: [] for m in args.methods}
    if args.resume and (output / "federation.json").is_file():
        try:
            runs = finished_runs(output / "federation.json", values, sites, args.methods)
        except DataError as exc:
            parser.error(str(exc))
    budget = {"rounds": rounds, "local_steps": local_steps,
              "steps_per_site": rounds * local_steps,
              "pooled_steps": rounds * local_steps * len(sites)}

    def expected(method: str) -> dict[str, int]:
        if method == POOLED:
            return {POOLED: budget["pooled_steps"]}
        return dict.fromkeys(sites, method_steps(method, values, rounds, local_steps))

    def write(seeds: int) -> str:
        # Written after every seed: a long benchmark stopped early keeps its finished seeds.
        equal = all(run.steps == expected(m) for m, seed_runs in runs.items()
                    for run in seed_runs)
        summary = summarise(runs, sites)
        report: dict[str, Any] = {
            "data": str(data), "sites": sites, "seeds": list(range(seeds)),
            "methods": args.methods, "run_config": values, "budget": budget,
            "equal_steps": equal,
            "budget_notes": budget_notes(args.methods, values, rounds, local_steps),
            "summary": summary, "acceptance": acceptance(summary, sites),
            "runs": {m: [{"seed": seed, **asdict(r)} for seed, r in enumerate(seed_runs)]
                     for m, seed_runs in runs.items()},
        }
        output.mkdir(parents=True, exist_ok=True)
        text = markdown(report)
        (output / "federation.json").write_text(json.dumps(_json_safe(report), indent=2) + "\n")
        (output / "federation.md").write_text(text)
        plot(summary, output / "federation.png")
        return text

    text = ""
    for seed in range(args.seeds):
        seeded = {**values, "seed": seed}
        for method in args.methods:
            if len(runs[method]) > seed:
                print(f"== seed {seed}: {method} (kept from {output / 'federation.json'})",
                      flush=True)
                continue
            print(f"== seed {seed}: {method}", flush=True)
            where = output / "runs" / method / f"seed-{seed}"
            if method in CENTRALISED:
                run = centralised(folders, RunConfig.from_user_config(seeded), method == POOLED,
                                  where / "site-state")
            else:
                run = federated(data, method_values(method, seeded, rounds, local_steps), where,
                                echo=lambda line: print("   ", line, flush=True))
            runs[method].append(run)
        text = write(seed + 1)
        print(f"== seeds 0-{seed} written to {output / 'federation.json'}", flush=True)
    print("\n" + text)
    print(f"wrote {output / 'federation.json'}, federation.md and federation.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
