"""fedseg's performance figures in one command, each a ratio or a pair measured side by side.

Run from the repository root::

    python -m benchmarks.suite            # the full suite: under 15 minutes on a 2-core CPU
    python -m benchmarks.suite --quick    # a smoke run of every section (tests/test_suite.py)

Sections (``--only NAME`` runs a subset):

* ``federation``: wall time of R rounds x N sites through Flower's simulation engine
  (``fedseg simulate``, the product's own path) against the same local steps run
  directly in one process (:meth:`SiteTrainer.train` on each site in turn, same
  network, data and seeds, FedAvg in NumPy), with and without the simulation's
  start-up;
* ``startup``: that command from launch to the first round, where the time goes, the
  first round against a later one (``train_seconds``/``evaluate_seconds`` of
  ``metrics.json``), and the fixed floor of Flower's simulation engine (Ray) measured
  with apps that do nothing;
* ``data``: building a site's trainer (its cases read and made ready for a round) in a
  fresh process with an empty state folder (cold) and again, in another fresh process,
  with the folder the first one left (warm), plus a second build in the same process;
* ``communication``: bytes per site per round for the whole model, the shared
  parameters (adapter+local-norm) and float16 transfer of those, and the validation
  Dice of the federation run repeated with ``transfer-dtype=float16``;
* ``scale``: 2, 8 and 32 virtual sites on a tiny network: time per round and the peak
  memory of the whole process tree (Ray's processes included, read from ``/proc``);
* ``inference``: latency of the predict path (:func:`client.inference.predict_classes`)
  per 2D fundus-sized image and per 3D volume, warm, and the start-up of a fresh
  ``fedseg predict`` process apart;
* ``throughput``: training cases per second per site for the simulation's 2D and 3D
  settings on the CPU (and on CUDA with and without AMP where available).

Every measurement that starts processes, sets PyTorch's threads or trains runs in a
fresh interpreter of its own (``--part``), so sections cannot disturb each other.
The command prints one table per section and a summary, and writes ``suite.json``
(everything) and ``suite.png`` (scale and start-up) into ``--out``
(``benchmarks/results/`` by default).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from datetime import datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
SECTIONS = ("federation", "startup", "data", "communication", "scale", "inference",
            "throughput")
PART_MARK = "SUITE-PART-RESULT "

#: Acceptance figures of issue 13.
OVERHEAD_TARGET = 1.15
DICE_TOLERANCE = 0.005
MEMORY_LIMIT_GIB = 8.0

#: The tiny network and data of the scale section (and of every simulation in --quick).
TINY_RUN_CONFIG = "channels='8,16' patch-size='32,32' local-steps=2 batch-size=2"
TINY_DATA = ("--cases", "4", "--size", "32")


@dataclass(frozen=True)
class Budget:
    """How much each section does: the full suite or the ``--quick`` smoke run."""

    quick: bool
    #: ``fedseg simulate`` arguments of the federation run (sites and rounds apart).
    federation_args: tuple[str, ...]
    federation_sites: int
    federation_rounds: int
    scale_sites: tuple[int, ...]
    scale_rounds: int
    #: (dims, cases, side) of the synthetic sites the data section reads.
    data_sites: tuple[tuple[int, int, int], ...]
    #: Input shapes of the inference section's 2D and 3D case.
    inference_shapes: tuple[tuple[int, ...], tuple[int, ...]]
    inference_repeats: int
    #: Local steps of the throughput section's warm-up and timed rounds (``0``: the
    #: preset's), and its synthetic 2D and 3D sites' cases.
    throughput_steps: tuple[int, int]
    throughput_cases: tuple[int, int]
    #: Measure the floor of Flower's engine and fresh interpreters' imports, and repeat
    #: the federation run with float16 transfer.
    floor_and_imports: bool
    float16_run: bool
    #: Run the direct, inference and throughput measurements in fresh interpreters;
    #: ``--quick`` runs them in the suite's own process to save their imports.
    isolate: bool


FULL = Budget(quick=False, federation_args=(), federation_sites=3, federation_rounds=3,
              scale_sites=(2, 8, 32), scale_rounds=2, data_sites=((2, 24, 256), (3, 8, 64)),
              inference_shapes=((3, 584, 565), (1, 96, 96, 64)), inference_repeats=5,
              throughput_steps=(2, 0), throughput_cases=(24, 8), floor_and_imports=True,
              float16_run=True, isolate=True)
QUICK = Budget(quick=True, federation_args=(*TINY_DATA, "--run-config", TINY_RUN_CONFIG),
               federation_sites=2, federation_rounds=2, scale_sites=(2,), scale_rounds=2,
               data_sites=((2, 6, 64),), inference_shapes=((3, 96, 96), (1, 64, 64, 64)),
               inference_repeats=1, throughput_steps=(1, 1), throughput_cases=(4, 2),
               floor_and_imports=False, float16_run=False, isolate=False)


# --- running commands, with their output's timestamps and their process tree's memory -----

@dataclass
class Timed:
    """A finished command: its output lines, each with seconds since launch, and its costs.

    Attributes
    ----------
    lines : list of (float, str)
        Every line of stdout and stderr, with the seconds since the launch it arrived at.
    wall_s : float
        Launch to exit.
    peak_rss : int
        Largest sum of resident memory over the process and all its descendants (bytes),
        sampled every ``interval``; shared pages count once per process that maps them.
    peak_pss : int
        Largest sum of proportional set sizes (shared pages split between their users),
        or 0 where ``/proc/<pid>/smaps_rollup`` cannot be read.
    peak_processes : int
        Most processes in the tree at one sample.
    cpu : list of (float, float)
        CPU seconds (user and system) the tree had used by each sample's time: every
        process ever seen counts with its latest reading, so a process's last
        ``interval`` before it exits is missed. Unlike wall time it hardly depends on
        what else the machine runs.
    """

    lines: list[tuple[float, str]]
    wall_s: float
    returncode: int
    peak_rss: int = 0
    peak_pss: int = 0
    peak_processes: int = 0
    cpu: list[tuple[float, float]] = field(default_factory=list)

    def cpu_at(self, when: float) -> float:
        """Return the tree's CPU seconds at the last sample no later than ``when``."""
        return next((c for t, c in reversed(self.cpu) if t <= when), 0.0)

    def first(self, pattern: str) -> float | None:
        """Return the time of the first line matching the regular expression ``pattern``."""
        regex = re.compile(pattern)
        return next((t for t, line in self.lines if regex.search(line)), None)

    def last(self, pattern: str) -> float | None:
        """Return the time of the last line matching ``pattern``."""
        regex = re.compile(pattern)
        return next((t for t, line in reversed(self.lines) if regex.search(line)), None)

    def tail(self, n: int = 30) -> str:
        """Return the last ``n`` lines, for an error message."""
        return "\n".join(line for _, line in self.lines[-n:])


_PAGE = os.sysconf("SC_PAGE_SIZE")
_TICK = os.sysconf("SC_CLK_TCK")


def _processes() -> tuple[dict[int, list[int]], dict[int, float]]:
    """Return every process's children and CPU seconds, read from ``/proc/<pid>/stat``."""
    children: dict[int, list[int]] = {}
    cpu: dict[int, float] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(entry.path, "stat").read_text()
        except OSError:
            continue
        # The command name is in parentheses and may hold spaces; fields follow the last
        # ')': state, ppid, ..., utime and stime 12th and 13th.
        fields = stat[stat.rindex(")") + 2:].split()
        children.setdefault(int(fields[1]), []).append(int(entry.name))
        cpu[int(entry.name)] = (int(fields[11]) + int(fields[12])) / _TICK
    return children, cpu


def process_tree(pid: int) -> tuple[list[int], dict[int, float]]:
    """Return ``pid`` and its descendants (Ray's daemons and workers included), with CPU."""
    children, cpu = _processes()
    tree, todo = [], [pid]
    while todo:
        current = todo.pop()
        tree.append(current)
        todo.extend(children.get(current, []))
    return tree, {p: cpu[p] for p in tree if p in cpu}


def tree_memory(pid: int, members: list[int] | None = None) -> tuple[int, int, int]:
    """Return (RSS, PSS, processes) summed over the process tree of ``pid``, in bytes."""
    rss = pss = count = 0
    for member in members if members is not None else process_tree(pid)[0]:
        try:
            rss += int(Path(f"/proc/{member}/statm").read_text().split()[1]) * _PAGE
            count += 1
        except (OSError, ValueError, IndexError):
            continue
        try:
            for line in Path(f"/proc/{member}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    pss += int(line.split()[1]) * 1024
                    break
        except (OSError, ValueError):
            pass
    return rss, pss, count


def run_command(cmd: Sequence[str], *, sample_memory: bool = False, interval: float = 0.25,
                env: Mapping[str, str] | None = None, timeout: float = 900.0) -> Timed:
    """Run ``cmd`` from the repository root, timing every output line as it arrives."""
    environment = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    # The repository first on the path, whichever checkout launched the suite.
    environment["PYTHONPATH"] = os.pathsep.join(
        [str(REPO), *filter(None, [environment.get("PYTHONPATH", "")])])
    started = time.monotonic()
    proc = subprocess.Popen(list(cmd), cwd=REPO, env=environment, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, errors="replace")
    timed = Timed([], 0.0, 0)
    done = threading.Event()

    seen: dict[int, float] = {}

    def sample() -> None:
        while not done.is_set():
            members, cpu = process_tree(proc.pid)
            seen.update(cpu)
            timed.cpu.append((time.monotonic() - started, sum(seen.values())))
            rss, pss, count = tree_memory(proc.pid, members)
            timed.peak_rss = max(timed.peak_rss, rss)
            timed.peak_pss = max(timed.peak_pss, pss)
            timed.peak_processes = max(timed.peak_processes, count)
            done.wait(interval)

    sampler = threading.Thread(target=sample, daemon=True)
    if sample_memory:
        sampler.start()
    killer = threading.Timer(timeout, proc.kill)
    killer.start()
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            timed.lines.append((time.monotonic() - started, line.rstrip("\n")))
        timed.returncode = proc.wait()
    except BaseException:
        # Stopped (Ctrl-C, or SIGTERM from timeout): a simulation must not run on.
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
        raise
    finally:
        killer.cancel()
        done.set()
        if sample_memory:
            sampler.join()
    timed.wall_s = time.monotonic() - started
    return timed


def run_part(name: str, isolate: bool = True, **args: Any) -> dict[str, Any]:
    """Run ``--part name`` in a fresh interpreter (or here) and return what it reported."""
    if not isolate:
        import torch

        threads = torch.get_num_threads()
        try:
            # Through JSON, as the arguments reach a fresh interpreter.
            return PARTS[name](**json.loads(json.dumps(args, default=str)))
        finally:
            torch.set_num_threads(threads)  # a site's num-threads must not leak onwards
    timed = run_command([sys.executable, "-m", "benchmarks.suite", "--part", name,
                         "--part-args", json.dumps(args, default=str)])
    for _, line in reversed(timed.lines):
        if line.startswith(PART_MARK):
            result: dict[str, Any] = json.loads(line[len(PART_MARK):])
            result["process_wall_s"] = timed.wall_s
            return result
    raise RuntimeError(f"benchmark part {name} failed (exit {timed.returncode}):\n"
                       f"{timed.tail()}")


# --- the simulation command ---------------------------------------------------------------

@dataclass
class SimulationRun:
    """One ``fedseg simulate`` command, timed, with the run folder it wrote."""

    timed: Timed
    run_dir: Path
    history: Any  # server.history.MetricsHistory

    @property
    def round_seconds(self) -> list[float]:
        """Seconds of each round: its train and evaluate phases (``metrics.json``)."""
        return [(r.train_seconds or 0.0) + (r.evaluate_seconds or 0.0)
                for r in self.history.rounds]

    @property
    def final_dice(self) -> float:
        """The last round's case-weighted mean validation Dice."""
        return float(self.history.rounds[-1].mean_val_dice)

    def phases(self) -> dict[str, float]:
        """Return where the command's time went, from its output's timestamps.

        The round lines are printed when a round ends; a round began its duration
        (``metrics.json``) earlier. Flower starts right after the last preflight line
        and has finished when the cross-site evaluation is announced.
        """
        t = self.timed
        first_output = t.lines[0][0] if t.lines else 0.0
        configured = t.first(r"^\d+ sites, ") or first_output
        preflight_end = t.last(r"^\s+\S+\s+\d+ train /\s+\d+ val cases") or configured
        round1_end = t.first(r"^round 1/\d+:")
        flower_end = t.first(r"^cross-site evaluation") or t.wall_s
        if round1_end is None:
            raise RuntimeError(f"no round finished:\n{t.tail()}")
        round1_start = round1_end - self.round_seconds[0]
        return {
            "interpreter_and_imports_s": first_output,
            "synthetic_data_s": configured - first_output,
            "preflight_s": preflight_end - configured,
            "flower_start_to_round1_s": round1_start - preflight_end,
            "rounds_s": round1_end + sum(self.round_seconds[1:]) - round1_start,
            "flower_wall_s": flower_end - preflight_end,
            "after_flower_s": t.wall_s - flower_end,
            "command_wall_s": t.wall_s,
        }

    def cpu(self) -> dict[str, float]:
        """Return the CPU seconds of the command's process tree, whole and in its phases."""
        t = self.timed
        preflight_end = t.last(r"^\s+\S+\s+\d+ train /\s+\d+ val cases") or 0.0
        round1_end = t.first(r"^round 1/\d+:") or 0.0
        last_round_end = t.last(r"^round \d+/\d+:") or 0.0
        flower_end = t.first(r"^cross-site evaluation") or t.wall_s
        return {
            "command_s": t.cpu[-1][1] if t.cpu else 0.0,
            "flower_s": t.cpu_at(flower_end) - t.cpu_at(preflight_end),
            "later_rounds_s": t.cpu_at(last_round_end) - t.cpu_at(round1_end),
        }


class Simulations:
    """Runs ``fedseg simulate`` commands, each set of arguments once per suite run."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._done: dict[tuple[str, ...], SimulationRun] = {}

    def run(self, args: Sequence[str]) -> SimulationRun:
        """Return the run of ``fedseg simulate ARGS``, starting it on first request."""
        from server.history import MetricsHistory

        key = tuple(args)
        if key not in self._done:
            output = self.root / f"sim-{len(self._done)}"
            print(f"  fedseg simulate {' '.join(args)}", flush=True)
            timed = run_command([sys.executable, "-m", "fedseg", "simulate", *args,
                                 "--output", str(output)], sample_memory=True)
            runs = sorted(output.glob("sim-*"))
            if timed.returncode != 0 or not runs:
                raise RuntimeError(f"fedseg simulate {' '.join(args)} failed "
                                   f"(exit {timed.returncode}):\n{timed.tail()}")
            history = MetricsHistory.read(runs[-1] / "metrics.json")
            self._done[key] = SimulationRun(timed, runs[-1], history)
        return self._done[key]


def federation_args(budget: Budget, extra: str = "") -> list[str]:
    """Return the arguments of the federation run (``extra``: more run-config keys)."""
    args = ["--sites", str(budget.federation_sites), "--rounds", str(budget.federation_rounds),
            *budget.federation_args]
    if extra:
        args += ["--run-config", extra]
    return args


def scale_args(sites: int, budget: Budget) -> list[str]:
    """Return the arguments of a scale run with ``sites`` virtual sites."""
    return ["--sites", str(sites), "--rounds", str(budget.scale_rounds), *TINY_DATA,
            "--run-config", TINY_RUN_CONFIG]


def _overrides(args: Sequence[str]) -> dict[str, Any]:
    """Return the run-config overrides ``fedseg simulate ARGS`` applies."""
    from fedseg.cli import _parse_overrides

    values = [args[i + 1] for i, a in enumerate(args) if a == "--run-config"]
    overrides = _parse_overrides(values or None)
    if "--rounds" in args:
        overrides["num-server-rounds"] = int(args[args.index("--rounds") + 1])
    return overrides


# --- sections -----------------------------------------------------------------------------

def section_federation(budget: Budget, sims: Simulations) -> dict[str, Any]:
    """Flower's simulation against the same local steps run directly, in one process."""
    args = federation_args(budget)
    sim = sims.run(args)
    folders = sorted(p for p in (sim.run_dir / "synthetic-data").iterdir() if p.is_dir())
    direct = run_part("direct", budget.isolate, folders=[str(f) for f in folders],
                      overrides=_overrides(args), state=str(sims.root / "direct-state"))
    phases = sim.phases()
    rounds = sim.round_seconds
    direct_total = direct["build_s"] + sum(direct["round_s"])
    direct_cpu = direct["build_cpu_s"] + sum(direct["round_cpu_s"])
    sim_cpu = sim.cpu()
    later = slice(1, None)
    model = sim.history.run_config["model"]
    return {
        "sites": budget.federation_sites, "rounds": budget.federation_rounds,
        "network": f"{model['model-network']} ({model['model-channels']}), patch "
                   f"{model['model-patch-size']}",
        "simulate_args": args, "run_config": sim.history.run_config,
        "simulation": {"flower_wall_s": phases["flower_wall_s"], "round_s": rounds,
                       "final_mean_dice": sim.final_dice},
        "direct": {"build_s": direct["build_s"], "round_s": direct["round_s"],
                   "total_s": direct_total, "final_mean_dice": direct["final_mean_dice"],
                   "torch_threads": direct["torch_threads"]},
        "ratio_including_startup": phases["flower_wall_s"] / direct_total,
        "ratio_excluding_startup": sum(rounds[later]) / sum(direct["round_s"][later]),
        "cpu": {"simulation": sim_cpu, "direct_total_s": direct_cpu,
                "direct_later_rounds_s": sum(direct["round_cpu_s"][later]),
                "ratio_including_startup": sim_cpu["flower_s"] / direct_cpu,
                "ratio_excluding_startup": (sim_cpu["later_rounds_s"]
                                            / sum(direct["round_cpu_s"][later]))},
        "target": OVERHEAD_TARGET,
        "notes": [
            "including start-up: Flower's whole run (Ray's start, the workers' start and "
            "imports, trainers built, every round with its checkpoint) against building the "
            "trainers plus every round directly",
            "excluding start-up: rounds 2.. (train and evaluate phases, metrics.json) against "
            "the same rounds directly; the trainers are built on both sides by then, while "
            "round 1 of the simulation also holds its workers' start-up",
            "the simulation runs up to one site per CPU core at once (1 thread each); the "
            "direct run takes the sites in turn with the same thread setting",
            "cpu: CPU seconds of the simulate command's whole process tree (Ray's daemons "
            "and workers included) in the same windows, against the direct process's; they "
            "depend far less than wall time on other jobs sharing the machine",
        ],
    }


def section_startup(budget: Budget, sims: Simulations) -> dict[str, Any]:
    """Where the simulation command's start-up goes, and the floor of Flower's engine."""
    sim = sims.run(federation_args(budget))
    phases = sim.phases()
    train = [r.train_seconds or 0.0 for r in sim.history.rounds]
    later_train = statistics.median(train[1:]) if len(train) > 1 else 0.0
    rounds = sim.round_seconds
    later_round = statistics.median(rounds[1:]) if len(rounds) > 1 else None
    first_extra = train[0] - later_train
    floor, worker_imports = None, None
    if budget.floor_and_imports:
        floor = run_part("floor", sites=budget.federation_sites)
        worker_imports = run_command([sys.executable, "-c", "import client.app"]).wall_s
    to_first_step = (phases["interpreter_and_imports_s"] + phases["synthetic_data_s"]
                     + phases["preflight_s"] + phases["flower_start_to_round1_s"]
                     + first_extra)
    return {
        "sites": budget.federation_sites,
        "phases": phases, "cpu": sim.cpu(),
        "first_round_s": rounds[0], "later_round_s": later_round,
        "first_round_train_s": train[0], "later_round_train_s": later_train,
        "first_over_later": rounds[0] / later_round if later_round else None,
        "first_round_extra_train_s": first_extra,
        "command_to_first_training_step_s": to_first_step,
        "floor": floor,
        "worker_import_client_app_s": worker_imports,
        "notes": [
            "command_to_first_training_step_s is an estimate: launch to round 1's messages, "
            "plus what round 1's train phase took beyond a later one's (the workers' start, "
            "their imports and building the trainers all come before a site's first step)",
            "floor: the same simulation engine and resources with apps that do nothing",
            "worker_import_client_app_s: a fresh interpreter importing the ClientApp (torch, "
            "MONAI, Flower), as each Ray worker does before its first message",
        ],
    }


def section_data(budget: Budget, work: Path) -> dict[str, Any]:
    """Time making a site's cases ready: fresh processes, empty state folder, then reused."""
    from simulations.phantoms import write_synthetic_federation

    out: list[dict[str, Any]] = []
    for dims, cases, side in budget.data_sites:
        (folder,) = write_synthetic_federation(work / f"data-{dims}d", 1, cases,
                                               shape=(side,) * dims)
        state = work / f"data-{dims}d-state"
        cold = run_part("load", site=str(folder), state=str(state))
        warm = run_part("load", site=str(folder), state=str(state))
        out.append({
            "site": f"synthetic {dims}D, {cases} cases of {'x'.join([str(side)] * dims)}",
            "cases": cold["cases"],
            "cold_s": cold["build_s"], "warm_s": warm["build_s"],
            "warm_over_cold": warm["build_s"] / cold["build_s"],
            "same_process_again_s": cold["again_s"],
            "state_dir_bytes_after": warm["state_bytes"],
        })
    return {"sites": out, "notes": [
        "time to build SiteTrainer (read, decode and normalise every case, split, resize, "
        "network) in a fresh interpreter, imports excluded",
        "cold: empty state folder; warm: a new interpreter reusing the folder the cold one "
        "left; the operating system's file cache is warm in both",
        "same_process_again_s: a second build in the cold process (the per-process decode "
        "cache)",
    ]}


def section_communication(budget: Budget, sims: Simulations) -> dict[str, Any]:
    """Bytes per site per round, and the Dice of float16 transfer against float32."""
    from server.config import RunConfig
    from shared.networks import build_network
    from shared.partition import local_parameter_names, split_weights
    from shared.weights import for_wire, payload_bytes, state_to_numpy, to_record
    from simulations.simulate import SYNTHETIC_2D, SYNTHETIC_3D

    models = []
    for name, preset in (("2D", SYNTHETIC_2D), ("3D", SYNTHETIC_3D)):
        config = RunConfig.from_user_config({**preset, "adaptation": "adapter+local-norm"})
        net = build_network(config.model)
        whole = state_to_numpy(net.state_dict())
        shared, _ = split_weights(whole, local_parameter_names(net, config.model.adaptation))
        sizes = {"whole_model": payload_bytes(to_record(whole)),
                 "shared_float32": payload_bytes(to_record(for_wire(shared, "float32"))),
                 "shared_float16": payload_bytes(to_record(for_wire(shared, "float16")))}
        models.append({
            "network": f"{name} {config.model.network} {config.model.channels}",
            "adaptation": config.model.adaptation,
            "parameters": {"whole": sum(a.size for a in whole.values()),
                           "shared": sum(a.size for a in shared.values())},
            "bytes_per_message": sizes,
            # Down: the train and the evaluate message; up: the train reply.
            "bytes_per_site_per_round": {k: {"down": 2 * v, "up": v, "total": 3 * v}
                                         for k, v in sizes.items()},
            "float16_over_float32": sizes["shared_float16"] / sizes["shared_float32"],
            "shared_over_whole": sizes["shared_float32"] / sizes["whole_model"],
        })
    dice = None
    if budget.float16_run:
        f32 = sims.run(federation_args(budget))
        f16 = sims.run(federation_args(budget, "transfer-dtype='float16'"))
        per_site = {s.site: s.val_dice for s in f32.history.rounds[-1].sites}
        per_site16 = {s.site: s.val_dice for s in f16.history.rounds[-1].sites}
        dice = {"float32": f32.final_dice, "float16": f16.final_dice,
                "difference": f16.final_dice - f32.final_dice,
                "largest_site_difference": max(abs(per_site16[k] - v)
                                               for k, v in per_site.items()),
                "round_s": {"float32": f32.round_seconds, "float16": f16.round_seconds},
                "simulate_args": federation_args(budget)}
    return {
        "models": models,
        "dice": dice,
        "tolerance": DICE_TOLERANCE,
        "notes": ["bytes: the sum of the arrays' nbytes in the message's ArrayRecord",
                  "Dice: the federation run, and the same run with transfer-dtype=float16"],
    }


def section_scale(budget: Budget, sims: Simulations) -> dict[str, Any]:
    """Time per round and peak memory with more and more virtual sites."""
    rows = []
    for sites in budget.scale_sites:
        sim = sims.run(scale_args(sites, budget))
        rounds = sim.round_seconds
        rows.append({
            "sites": sites, "round_s": rounds,
            "later_round_s": statistics.median(rounds[1:]) if len(rounds) > 1 else None,
            "later_round_per_site_s": (statistics.median(rounds[1:]) / sites
                                       if len(rounds) > 1 else None),
            "peak_rss_gib": sim.timed.peak_rss / 2**30,
            "peak_pss_gib": sim.timed.peak_pss / 2**30,
            "peak_processes": sim.timed.peak_processes,
            "command_wall_s": sim.timed.wall_s, "command_cpu_s": sim.cpu()["command_s"],
        })
    return {"network": "unet (8,16), 32x32 patches, 4 cases of 32x32 per site, 2 local steps",
            "runs": rows, "memory_limit_gib": MEMORY_LIMIT_GIB,
            "notes": ["peak memory: the simulate command's whole process tree (driver, Ray's "
                      "daemons and workers), sampled every 0.25 s from /proc; RSS counts "
                      "shared pages once per process, PSS splits them"]}


def section_inference(budget: Budget) -> dict[str, Any]:
    """Warm latency of the predict path, and a fresh process's start-up apart."""
    warm = run_part("inference", budget.isolate, shapes=budget.inference_shapes,
                    repeats=budget.inference_repeats)
    help_ = run_command([sys.executable, "-m", "fedseg", "predict", "--help"])
    imports = (run_command([sys.executable, "-c", "import client.predict"]).wall_s
               if budget.floor_and_imports else None)
    return {**warm, "fedseg_predict_help_s": help_.wall_s, "import_predict_path_s": imports,
            "notes": ["latency: predict_classes on a synthetic array (sliding window as "
                      "fedseg predict), median of the timed runs after one warm-up, fastest "
                      "in brackets",
                      "start-up: a fresh interpreter running fedseg predict --help, and "
                      "importing client.predict (torch and MONAI), apart from the latency"]}


def section_throughput(budget: Budget) -> dict[str, Any]:
    """Training cases per second per site for the simulation's 2D and 3D settings."""
    import torch

    devices: list[tuple[str, bool]] = [("cpu", False)]
    if torch.cuda.is_available():
        devices += [("cuda", False), ("cuda", True)]
    # One thread per site is how the simulation runs its sites, and what other jobs on
    # the machine disturb least; PyTorch's default (0) is how a deployed site runs.
    configs = [(dims, device, amp, threads) for dims in (2, 3) for device, amp in devices
               for threads in ((1, 0) if device == "cpu" else (0,))]
    runs = run_part("throughput", budget.isolate, configs=configs,
                    steps=budget.throughput_steps, cases=budget.throughput_cases)["runs"]
    return {"runs": runs, "notes": [
        "one site's timed round of the preset's local steps (simulate's 2D and --dims 3 "
        "settings) after a short warm-up round, with 1 thread (as the simulation runs each "
        "site) and PyTorch's default (as a deployed site runs); cases = steps x batch size "
        "(one patch each)"]}


# --- parts: measurements that run in a fresh interpreter ------------------------------------

def part_direct(folders: list[str], overrides: dict[str, Any], state: str) -> dict[str, Any]:
    """Build each site's trainer, then train, average and evaluate each round, in turn."""
    import numpy as np
    import torch

    from client.trainer import SiteTrainer
    from server.app import initial_weights
    from server.config import RunConfig
    from shared.metrics import weighted_mean
    from simulations.simulate import SYNTHETIC_2D, build_run_values, simulated_sites

    paths = [Path(f) for f in folders]
    # The settings and sites fedseg simulate composes for its synthetic 2D folders.
    values = build_run_values(SYNTHETIC_2D, overrides, len(paths), Path(state) / "run")
    config = RunConfig.from_user_config(values)
    sites = simulated_sites(paths, Path(state))
    weights = initial_weights(config)
    started, cpu = time.perf_counter(), time.process_time()
    trainers = [SiteTrainer(site, config.model) for site in sites]
    build, build_cpu = time.perf_counter() - started, time.process_time() - cpu
    round_s, round_cpu, dice = [], [], []
    for rnd in range(1, config.num_server_rounds + 1):
        started, cpu = time.perf_counter(), time.process_time()
        results = [t.train(weights, config.plan(rnd)) for t in trainers]
        total = sum(r.num_examples for r in results)
        # FedAvg: the case-weighted mean, as Flower's strategy computes it.
        weights = {name: np.asarray(np.sum([(r.num_examples / total) * r.weights[name]
                                            for r in results], axis=0, dtype=np.float32))
                   for name in weights}
        evals = [t.evaluate(weights) for t in trainers]
        round_s.append(time.perf_counter() - started)
        round_cpu.append(time.process_time() - cpu)
        dice.append(weighted_mean([e.dice for e in evals],
                                  [float(e.num_examples) for e in evals]))
    return {"build_s": build, "round_s": round_s, "build_cpu_s": build_cpu,
            "round_cpu_s": round_cpu, "mean_dice": dice,
            "final_mean_dice": dice[-1], "torch_threads": torch.get_num_threads()}


IDLE_SECONDS = 5.0


def part_floor(sites: int) -> dict[str, Any]:
    """Flower's simulation engine with apps that do nothing: the fixed floor."""
    import logging

    started = time.perf_counter()
    from flwr.app import Message, MetricRecord, RecordDict
    from flwr.clientapp import ClientApp
    from flwr.serverapp import ServerApp
    from flwr.simulation import run_simulation

    imported = time.perf_counter() - started
    marks: dict[str, float] = {}
    server, client = ServerApp(), ClientApp()

    @server.main()
    def main(grid: Any, context: Any) -> None:
        marks["server_main"] = time.perf_counter()
        while len(list(grid.get_node_ids())) < sites:
            time.sleep(0.02)
        marks["nodes"] = time.perf_counter()
        for key in ("first_reply", "second_reply"):
            messages = [Message(RecordDict(), message_type="query", dst_node_id=node)
                        for node in grid.get_node_ids()]
            list(grid.send_and_receive(messages))
            marks[key] = time.perf_counter()
        # What the engine burns while nothing happens: Ray's daemons, its workers and the
        # driver's own threads, over a few idle seconds.
        before = sum(process_tree(os.getpid())[1].values())
        time.sleep(IDLE_SECONDS)
        members, cpu = process_tree(os.getpid())
        marks["idle_cpu"] = sum(cpu.values()) - before
        marks["idle_processes"] = len(members)
        marks["idle_end"] = time.perf_counter()

    @client.query()
    def query(msg: Message, context: Any) -> Message:
        return Message(RecordDict({"m": MetricRecord({"x": 1})}), reply_to=msg)

    logging.getLogger("flwr").setLevel(logging.ERROR)
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    cpus = max(1, os.cpu_count() or 1)
    begin = time.perf_counter()
    # The resources fedseg simulate asks for (simulations/simulate.py).
    run_simulation(server_app=server, client_app=client, num_supernodes=sites, backend_config={
        "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
        "init_args": {"num_cpus": cpus, "num_gpus": 0, "include_dashboard": False}})
    end = time.perf_counter()
    out: dict[str, Any] = {
        "sites": sites, "import_flower_s": imported, "run_simulation_s": end - begin,
        "to_server_main_s": marks["server_main"] - begin,
        "to_first_replies_s": marks["first_reply"] - begin,
        "second_round_trip_s": marks["second_reply"] - marks["first_reply"],
        "idle_cpu_per_s": marks["idle_cpu"] / IDLE_SECONDS,
        "idle_processes": marks["idle_processes"],
        "teardown_s": end - marks["idle_end"],
    }
    import ray

    begin = time.perf_counter()
    ray.init(num_cpus=cpus, num_gpus=0, include_dashboard=False)
    out["ray_init_alone_s"] = time.perf_counter() - begin
    ray.shutdown()
    return out


def part_load(site: str, state: str) -> dict[str, Any]:
    """Build a site's trainer (imports done first, untimed); then once more in this process."""
    from client.config import SiteConfig
    from client.trainer import SiteTrainer
    from simulations.simulate import preflight_spec

    folder = Path(site)
    spec = preflight_spec(folder)
    config = SiteConfig(data_path=folder, site_name=folder.name, state_dir=Path(state),
                        device="cpu")
    started = time.perf_counter()
    trainer = SiteTrainer(config, spec)
    build = time.perf_counter() - started
    started = time.perf_counter()
    SiteTrainer(config, spec)
    again = time.perf_counter() - started
    state_bytes = sum(p.stat().st_size for p in Path(state).rglob("*") if p.is_file()) \
        if Path(state).is_dir() else 0
    return {"build_s": build, "again_s": again, "state_bytes": state_bytes,
            "cases": len(trainer.data.train) + len(trainer.data.val)}


#: Networks of the inference section: the default 2D U-Net on RGB fundus images, and
#: the 3D U-Net (the cases of benchmarks/export_latency.py).
INFERENCE_NETWORKS: tuple[tuple[str, dict[str, Any]], ...] = (
    ("2D image", {"channels": (16, 32, 64, 128), "in_channels": 3, "patch_size": (64, 64)}),
    ("3D volume", {"channels": (8, 16, 32, 64), "patch_size": (64, 64, 64)}),
)


def part_inference(shapes: list[list[int]], repeats: int) -> dict[str, Any]:
    """Warm latency of predict_classes per 2D image and per 3D volume."""
    import numpy as np
    import torch

    from client.inference import Tiling, predict_classes
    from shared.config import ModelSpec
    from shared.networks import build_network

    rows = []
    default = torch.get_num_threads()
    # fedseg predict runs with PyTorch's default threads; one thread is the figure that
    # other jobs on the machine disturb least.
    for threads in sorted({1, default}):
        torch.set_num_threads(threads)
        for (name, spec_args), shape in zip(INFERENCE_NETWORKS, shapes, strict=True):
            spec = ModelSpec(**spec_args)
            torch.manual_seed(0)
            net = build_network(spec).eval()
            image = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
            device = torch.device("cpu")
            predict_classes(net, image, Tiling.of(spec), device)  # warm-up
            times = []
            for _ in range(repeats):
                started = time.perf_counter()
                predict_classes(net, image, Tiling.of(spec), device)
                times.append(time.perf_counter() - started)
            rows.append({"case": name, "threads": threads, "input_shape": list(shape),
                         "patch_size": list(spec.patch_size), "channels": list(spec.channels),
                         "median_s": statistics.median(times), "min_s": min(times),
                         "all_s": times})
    torch.set_num_threads(default)
    return {"cases": rows, "default_threads": default, "device": "cpu"}


def part_throughput(configs: list[tuple[int, str, bool, int]], steps: tuple[int, int],
                    cases: tuple[int, int]) -> dict[str, Any]:
    """Train synthetic sites for a timed round each, per (dims, device, AMP, threads)."""
    import torch

    default = torch.get_num_threads()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            runs = []
            for dims, device, amp, threads in configs:
                # 0: PyTorch's default, which an earlier one-thread configuration changed.
                torch.set_num_threads(threads or default)
                runs.append(_throughput(dims, device, amp, threads, steps, cases[dims - 2],
                                        Path(tmp)))
            return {"runs": runs}
    finally:
        torch.set_num_threads(default)


def _throughput(dims: int, device: str, amp: bool, threads: int, steps: tuple[int, int],
                cases: int, tmp: Path) -> dict[str, Any]:
    import torch

    from client.config import SiteConfig
    from client.trainer import SiteTrainer
    from server.app import initial_weights
    from server.config import RunConfig
    from simulations.phantoms import write_synthetic_federation
    from simulations.simulate import SYNTHETIC_2D, SYNTHETIC_3D

    preset = SYNTHETIC_2D if dims == 2 else SYNTHETIC_3D
    config = RunConfig.from_user_config(preset)
    side = 96 if dims == 2 else 48  # fedseg simulate's synthetic sizes
    root = tmp / f"data-{dims}d"  # written once, for the first device that needs it
    folder = (sorted(root.iterdir()) if root.is_dir()
              else write_synthetic_federation(root, 1, cases, shape=(side,) * dims))[0]
    site = SiteConfig(data_path=folder, state_dir=tmp / f"state-{dims}-{device}-{amp}",
                      device=device, amp=amp, num_threads=threads)
    trainer = SiteTrainer(site, config.model)
    weights = initial_weights(config)
    warmup, timed = steps
    trainer.train(weights, replace(config.plan(1), local_steps=warmup))
    plan = replace(config.plan(2), local_steps=timed) if timed else config.plan(2)
    if device == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    result = trainer.train(weights, plan)
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    trained = result.steps * plan.batch_size
    return {"dims": dims, "device": device, "amp": amp, "steps": result.steps,
            "batch_size": plan.batch_size, "patch_size": list(config.model.patch_size),
            "channels": list(config.model.channels), "seconds": seconds,
            "cases_per_s": trained / seconds, "torch_threads": torch.get_num_threads()}


PARTS: dict[str, Callable[..., dict[str, Any]]] = {
    "direct": part_direct, "floor": part_floor, "load": part_load,
    "inference": part_inference, "throughput": part_throughput,
}


# --- printing -----------------------------------------------------------------------------

def _s(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f} s"


def _ms(value: float) -> str:
    return f"{1e3 * value:.0f} ms"


def _table(title: str, rows: Sequence[tuple[str, str]]) -> None:
    print(f"\n{title}")
    width = max(len(label) for label, _ in rows)
    for label, value in rows:
        print(f"  {label:<{width}}  {value}")


def print_section(name: str, r: dict[str, Any]) -> None:
    """Print one section's table."""
    if name == "federation":
        sim, direct, cpu = r["simulation"], r["direct"], r["cpu"]
        _table(f"federation overhead: {r['rounds']} rounds x {r['sites']} sites, "
               f"{r['network']}", [
                   ("Flower simulation, whole run", _s(sim["flower_wall_s"])),
                   ("  its rounds (metrics.json)", " + ".join(f"{s:.1f}" for s in
                                                              sim["round_s"]) + " s"),
                   ("direct, one process", f"build {direct['build_s']:.1f} s + rounds "
                    + " + ".join(f"{s:.1f}" for s in direct["round_s"]) + " s"),
                   ("wall ratio including start-up", f"{r['ratio_including_startup']:.2f}"),
                   ("wall ratio excluding start-up (rounds 2..)",
                    f"{r['ratio_excluding_startup']:.2f}  (target <= {r['target']})"),
                   ("CPU s sim / direct, including start-up",
                    f"{cpu['simulation']['flower_s']:.1f} / {cpu['direct_total_s']:.1f} "
                    f"(ratio {cpu['ratio_including_startup']:.2f})"),
                   ("CPU s sim / direct, rounds 2..",
                    f"{cpu['simulation']['later_rounds_s']:.1f} / "
                    f"{cpu['direct_later_rounds_s']:.1f} (ratio "
                    f"{cpu['ratio_excluding_startup']:.2f})"),
                   ("final mean Dice sim / direct", f"{sim['final_mean_dice']:.4f} / "
                    f"{direct['final_mean_dice']:.4f}"),
               ])
    elif name == "startup":
        p, f = r["phases"], r["floor"]
        rows = [
            ("interpreter and imports", _s(p["interpreter_and_imports_s"])),
            ("synthetic data written", _s(p["synthetic_data_s"])),
            ("preflight (every case read)", _s(p["preflight_s"])),
            ("Flower start to round 1", _s(p["flower_start_to_round1_s"])),
            ("round 1 train beyond a later one", _s(r["first_round_extra_train_s"])),
            ("command to first training step", _s(r["command_to_first_training_step_s"])
             + " (estimate)"),
            ("first round / later round", f"{_s(r['first_round_s'])} / "
             f"{_s(r['later_round_s'])}"),
        ]
        if f is not None:
            rows += [
                ("floor: trivial apps, launch to replies", _s(f["to_first_replies_s"])),
                ("floor: of which ray.init alone", _s(f["ray_init_alone_s"])),
                ("floor: a later round trip", _ms(f["second_round_trip_s"])),
                ("floor: idle engine's CPU", f"{f['idle_cpu_per_s']:.2f} CPU s per s"),
                ("floor: teardown", _s(f["teardown_s"])),
                ("fresh interpreter: import client.app", _s(r["worker_import_client_app_s"])),
            ]
        _table(f"start-up: fedseg simulate, {r['sites']} sites", rows)
    elif name == "data":
        rows = []
        for s in r["sites"]:
            rows.append((s["site"], f"cold {_s(s['cold_s'])}, warm {_s(s['warm_s'])} "
                         f"(x{s['warm_over_cold']:.2f}), same process again "
                         f"{_s(s['same_process_again_s'])}"))
        _table("data: a site's cases ready for a round (fresh process, SiteTrainer built)", rows)
    elif name == "communication":
        rows = []
        for m in r["models"]:
            b = m["bytes_per_site_per_round"]
            rows.append((f"{m['network']}, {m['adaptation']}",
                         f"whole {b['whole_model']['total'] / 1e3:.0f} kB, shared "
                         f"{b['shared_float32']['total'] / 1e3:.0f} kB, float16 "
                         f"{b['shared_float16']['total'] / 1e3:.0f} kB (float16/float32 "
                         f"{m['float16_over_float32']:.3f}, shared/whole "
                         f"{m['shared_over_whole']:.4f})"))
        d = r["dice"]
        if d is not None:
            rows.append(("final mean Dice float32 / float16", f"{d['float32']:.4f} / "
                         f"{d['float16']:.4f} (difference {d['difference']:+.4f}, tolerance "
                         f"{r['tolerance']})"))
        _table("communication: bytes per site per round (2 messages down, 1 up)", rows)
    elif name == "scale":
        rows = [(f"{x['sites']} sites", f"round {' / '.join(f'{s:.1f}' for s in x['round_s'])} "
                 f"s, peak RSS {x['peak_rss_gib']:.2f} GiB (PSS {x['peak_pss_gib']:.2f}), "
                 f"{x['peak_processes']} processes") for x in r["runs"]]
        _table(f"scale: {r['network']}", rows)
    elif name == "inference":
        rows = [(f"{c['case']} {'x'.join(map(str, c['input_shape']))}, {c['threads']} "
                 f"thread{'s' if c['threads'] > 1 else ''}",
                 f"{_ms(c['median_s'])} ({_ms(c['min_s'])})") for c in r["cases"]]
        rows += [("fresh process: fedseg predict --help", _s(r["fedseg_predict_help_s"])),
                 ("fresh process: import client.predict", _s(r["import_predict_path_s"]))]
        if r["import_predict_path_s"] is None:
            rows.pop()
        _table("inference: predict path, warm (median, fastest in brackets)", rows)
    elif name == "throughput":
        rows = [(f"{x['dims']}D on {x['device']}{' AMP' if x['amp'] else ''}, batch "
                 f"{x['batch_size']} of {'x'.join(map(str, x['patch_size']))}",
                 f"{x['cases_per_s']:.1f} cases/s ({x['steps']} steps in {x['seconds']:.1f} s,"
                 f" {x['torch_threads']} threads)") for x in r["runs"]]
        _table("throughput: training cases per second per site", rows)


def acceptance(results: Mapping[str, Any]) -> dict[str, Any]:
    """Return the issue's acceptance figures that this run measured, each with its verdict."""
    out: dict[str, Any] = {}
    if "federation" in results:
        ratio = results["federation"]["ratio_excluding_startup"]
        out["federation_overhead_excluding_startup"] = {
            "value": ratio, "target": OVERHEAD_TARGET, "met": ratio <= OVERHEAD_TARGET}
    if "communication" in results:
        comm = results["communication"]
        halves = all(m["float16_over_float32"] == 0.5 for m in comm["models"])
        out["float16_bytes_halve"] = {"value": [m["float16_over_float32"]
                                                for m in comm["models"]], "met": halves}
        if comm["dice"] is not None:
            diff = abs(comm["dice"]["difference"])
            out["float16_dice_change"] = {"value": diff, "target": DICE_TOLERANCE,
                                          "met": diff <= DICE_TOLERANCE}
    if "scale" in results:
        biggest = max(results["scale"]["runs"], key=lambda x: x["sites"])
        out["scale_peak_memory"] = {"sites": biggest["sites"], "value": biggest["peak_rss_gib"],
                                    "target": MEMORY_LIMIT_GIB,
                                    "met": biggest["peak_rss_gib"] < MEMORY_LIMIT_GIB}
    return out


def plot(results: Mapping[str, Any], path: Path) -> Path | None:
    """Draw the scale and start-up figures into ``path``; None when neither was measured."""
    panels = [k for k in ("scale", "startup") if k in results]
    if not panels:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullLocator

    fig, axes = plt.subplots(1, len(panels) + ("scale" in panels), figsize=(5 * (
        len(panels) + ("scale" in panels)), 3.8))
    axes = list(axes) if hasattr(axes, "__len__") else [axes]
    if "scale" in results:
        runs = results["scale"]["runs"]
        sites = [x["sites"] for x in runs]
        ax = axes.pop(0)
        ax.plot(sites, [x["round_s"][0] for x in runs], "o-", label="round 1")
        if all(x["later_round_s"] is not None for x in runs):
            ax.plot(sites, [x["later_round_s"] for x in runs], "s-", label="later round")
        ax.set(xscale="log", yscale="log", xlabel="virtual sites", ylabel="seconds per round",
               title="scale: time per round")
        ax.set_xticks(sites, [str(s) for s in sites])
        ax.xaxis.set_minor_locator(NullLocator())
        ax.legend()
        ax = axes.pop(0)
        ax.plot(sites, [x["peak_rss_gib"] for x in runs], "o-", label="RSS (sum)")
        ax.plot(sites, [x["peak_pss_gib"] for x in runs], "s-", label="PSS (sum)")
        ax.axhline(MEMORY_LIMIT_GIB, color="grey", ls="--", label=f"{MEMORY_LIMIT_GIB:g} GiB")
        ax.set(xscale="log", xlabel="virtual sites", ylabel="GiB", ylim=(0, None),
               title="scale: peak memory, whole process tree")
        ax.set_xticks(sites, [str(s) for s in sites])
        ax.xaxis.set_minor_locator(NullLocator())
        ax.legend()
    if "startup" in results:
        p = results["startup"]["phases"]
        parts = [("imports", p["interpreter_and_imports_s"]),
                 ("synthetic data", p["synthetic_data_s"]), ("preflight", p["preflight_s"]),
                 ("Flower to round 1", p["flower_start_to_round1_s"]),
                 ("round 1 extra", results["startup"]["first_round_extra_train_s"])]
        ax = axes.pop(0)
        left = 0.0
        for label, seconds in parts:
            ax.barh(["fedseg simulate"], [seconds], left=left, label=label)
            left += seconds
        floor = results["startup"]["floor"]
        if floor is not None:
            ax.barh(["trivial apps"], [floor["to_first_replies_s"]], color="grey",
                    label="floor: launch to replies")
        ax.set(xlabel="seconds from launch", title="start-up to the first training step")
        ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# --- command line -------------------------------------------------------------------------

def machine() -> dict[str, Any]:
    """Describe where the figures were taken."""
    import flwr
    import torch

    return {"python": platform.python_version(), "platform": platform.platform(),
            "cpu_count": os.cpu_count(), "load_average": list(os.getloadavg()),
            "torch": torch.__version__, "flwr": flwr.__version__ if hasattr(flwr, "__version__")
            else "unknown", "cuda": torch.cuda.is_available()}


@contextmanager
def _workdir(keep: Path | None) -> Iterator[Path]:
    if keep is not None:
        keep.mkdir(parents=True, exist_ok=True)
        yield keep
        return
    path = Path(tempfile.mkdtemp(prefix="fedseg-suite-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _write(results: dict[str, Any], started: float, out: Path) -> None:
    results["acceptance"] = acceptance(results)
    results["wall_s"] = time.monotonic() - started
    results["load_average_end"] = list(os.getloadavg())
    out.mkdir(parents=True, exist_ok=True)
    (out / "suite.json").write_text(json.dumps(results, indent=2, default=str) + "\n")


def run_suite(budget: Budget, sections: Sequence[str], out: Path,
              keep: Path | None = None) -> dict[str, Any]:
    """Measure ``sections`` and write ``suite.json`` (and ``suite.png``) into ``out``."""
    started = time.monotonic()
    results: dict[str, Any] = {
        "command": "python -m benchmarks.suite" + (" --quick" if budget.quick else ""),
        "quick": budget.quick, "started": datetime.now().isoformat(timespec="seconds"),
        "machine": machine()}
    with _workdir(keep) as work:
        sims = Simulations(work)
        steps: dict[str, Callable[[], dict[str, Any]]] = {
            "federation": lambda: section_federation(budget, sims),
            "startup": lambda: section_startup(budget, sims),
            "data": lambda: section_data(budget, work),
            "communication": lambda: section_communication(budget, sims),
            "scale": lambda: section_scale(budget, sims),
            "inference": lambda: section_inference(budget),
            "throughput": lambda: section_throughput(budget),
        }
        for name in SECTIONS:
            if name not in sections:
                continue
            print(f"[{time.monotonic() - started:5.0f} s] {name} ...", flush=True)
            begun = time.monotonic()
            results[name] = steps[name]()
            results[name]["section_wall_s"] = time.monotonic() - begun
            print_section(name, results[name])
            # Written after every section, so a suite stopped part-way keeps what it measured.
            _write(results, started, out)
    figure = plot(results, out / "suite.png")
    print("\nacceptance")
    for key, verdict in results["acceptance"].items():
        value = verdict["value"]
        shown = (f"{value:.3f}" if isinstance(value, float)
                 else ", ".join(f"{v:.3f}" for v in value))
        print(f"  {key:<40} {shown:>14}  {'met' if verdict['met'] else 'NOT met'}")
    print(f"\nsuite wall time {results['wall_s']:.0f} s; load average at start "
          f"{results['machine']['load_average'][0]:.1f}, at end "
          f"{results['load_average_end'][0]:.1f} on {os.cpu_count()} CPUs")
    print(f"wrote {out / 'suite.json'}" + (f" and {figure}" if figure else ""))
    return results


def main(argv: Sequence[str] | None = None) -> int:
    """Run the suite (or, with ``--part``, one measurement in this fresh interpreter)."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="a smoke run of every section on tiny settings")
    parser.add_argument("--only", action="append", choices=SECTIONS, default=None,
                        help="run this section (repeatable; default: all)")
    parser.add_argument("--out", type=Path, default=RESULTS,
                        help="folder for suite.json and suite.png (default benchmarks/results)")
    parser.add_argument("--keep", type=Path, default=None, metavar="DIR",
                        help="keep the simulations' run folders in DIR (default: a temporary "
                        "folder, removed)")
    parser.add_argument("--part", choices=sorted(PARTS), help=argparse.SUPPRESS)
    parser.add_argument("--part-args", default="{}", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.part:
        result = PARTS[args.part](**json.loads(args.part_args))
        print(PART_MARK + json.dumps(result), flush=True)
        return 0
    run_suite(QUICK if args.quick else FULL, args.only or SECTIONS, args.out, args.keep)
    return 0


if __name__ == "__main__":
    # SIGTERM (timeout, a job scheduler) unwinds like Ctrl-C, stopping the running command.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    raise SystemExit(main())
