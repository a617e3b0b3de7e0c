"""A starting model from public phantoms, and the one a DP simulation starts from by itself.

:func:`pretrain` trains a network on phantoms of one family of
:mod:`simulations.phantom_families` through the same data contract, augmentation
and trainer as a site (``python -m benchmarks.pretrain`` is its command).

DP-SGD from random weights spends a site's whole privacy budget on what any
segmentation network must learn. So when ``fedseg simulate`` runs sites under
DP-SGD on a planned configuration and names no ``initial-model``,
:func:`public_start` looks for a phantom family whose profile
(:data:`simulations.starting.PROFILES`) fits the sites' combined fingerprint,
pretrains the planned network on it in the simulating process, and starts the run
from that model with the family's recipe (what DP-SGD trains, and how). A deployment does the
same by hand: the
coordinator pretrains (or obtains) a public model and names it in the run config;
the ServerApp never trains.
"""

from __future__ import annotations

import json
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from client.config import SiteConfig
from client.trainer import SiteTrainer
from server.config import RunConfig
from shared.checkpoint import Checkpoint
from shared.config import ModelSpec, TrainPlan
from shared.networks import seed_everything
from shared.planning import Fingerprint, make_plan
from shared.settings import AUTO
from simulations.phantom_families import write_family_site
from simulations.starting import (
    DEFAULTS,
    PROFILES,
    choose_family,
    plan_without_dp,
    starting_model,
)

#: Run-config keys of the architecture and geometry a starting model fixes.
MODEL_KEYS = ("resize", "downsample", "patch-size", "channels")


def pretrain(family: str, spec: ModelSpec, work: Path, cases: int, steps: int, batch: int,
             seed: int, threads: int, chunks: int = 4,
             echo: Callable[[str], None] = print) -> tuple[dict[str, Any], Any]:
    """Train ``spec`` from seeded random weights on ``cases`` phantoms of ``family``.

    Returns
    -------
    tuple
        The record of what was trained (phantoms, steps, synthetic validation Dice per
        chunk) and the shared weights.
    """
    started, cpu = time.monotonic(), time.process_time()
    folder = write_family_site(work / "phantoms", family, cases, seed)
    site = SiteConfig(data_path=folder, state_dir=work / "state", device="auto",
                      num_threads=threads, val_fraction=0.1, seed=seed)
    seed_everything(seed)
    trainer = SiteTrainer(site, spec)
    weights = trainer.weights()
    per_chunk = -(-steps // chunks)
    history = []
    for chunk in range(1, chunks + 1):
        plan = TrainPlan(server_round=chunk, num_rounds=chunks, local_steps=per_chunk,
                         batch_size=batch, learning_rate=2e-3, lr_schedule="cosine", seed=seed)
        result = trainer.train(weights, plan)
        weights = result.weights
        dice = trainer.evaluate(weights).dice
        history.append({"steps": chunk * per_chunk, "train_loss": result.train_loss,
                        "synthetic_val_dice": dice})
        echo(f"  {chunk * per_chunk:>5} steps: loss {result.train_loss:.3f}, Dice on held-out "
             f"phantoms {dice:.3f} ({time.monotonic() - started:.0f} s)")
    record = {
        "family": family, "phantoms": cases, "phantom_seed": seed,
        "train_cases": trainer.num_train_cases, "steps": per_chunk * chunks, "batch": batch,
        "learning_rate": 2e-3, "lr_schedule": "cosine", "history": history,
        "saw": (f"{trainer.num_train_cases} synthetic '{family}' phantoms from "
                "simulations/phantom_families.py (geometric rules and random numbers, seed "
                f"{seed}); no real image, label or statistic of any site"),
        "seconds": time.monotonic() - started,
        "cpu_seconds": time.process_time() - cpu,
    }
    return record, weights


def public_start(fingerprints: Sequence[Fingerprint], values: Mapping[str, Any],
                 run_dir: Path, echo: Callable[[str], None]) -> dict[str, Any]:
    """Return ``values`` starting from a public phantom model, when a family fits.

    Parameters
    ----------
    fingerprints : sequence of Fingerprint
        Every site's, as the planning round will collect them (DP-SGD sites included).
    values : mapping
        The run's own run-config values, to be planned: the model is the plan's with
        them on top.
    run_dir : pathlib.Path
        The run folder; the model goes to ``starting-model.pt``, what it saw beside it.
    echo : callable
        Receives progress lines.

    Returns
    -------
    dict
        ``values`` with ``initial-model`` and, unless set, the family's recipe added
        (and the network it was pretrained as, when that is not the private plan's);
        or ``values`` unchanged when no family fits.
    """
    family = choose_family(fingerprints)
    if family is None:
        echo(starting_model(fingerprints))
        return dict(values)
    profile = PROFILES[family]
    # As the ServerApp's planning round: planned keys the values leave `auto`.
    planned = make_plan(fingerprints).to_run_config()
    network: dict[str, Any] = {}
    if profile.full_network:
        # The keys the run leaves to the planner (absent, or `auto` as a simulation's).
        public = plan_without_dp(fingerprints).to_run_config()
        network = {key: public[key] for key in MODEL_KEYS if values.get(key, AUTO) == AUTO}
    spec = RunConfig.from_user_config({**values, **network}, planned).model
    budget = DEFAULTS[family]
    echo(f"DP-SGD sites and no initial-model: pretraining the planned network "
         f"({','.join(map(str, spec.channels))}) on "
         f"{budget['cases']} public '{family}' phantoms ({budget['steps']} steps) to start from")
    with tempfile.TemporaryDirectory(prefix="fedseg-pretrain-") as tmp:
        record, weights = pretrain(family, spec, Path(tmp), budget["cases"], budget["steps"],
                                   budget["batch"], seed=0, threads=0, echo=echo)
    path = run_dir / "starting-model.pt"
    Checkpoint(spec, weights, 0).save(path)
    record["model"] = spec.to_config()
    path.with_name(path.name + ".json").write_text(json.dumps(record, indent=2) + "\n")
    # The network goes with the values: the private plan would pick another one.
    return {**profile.recipe, **values, **network, "initial-model": str(path)}
