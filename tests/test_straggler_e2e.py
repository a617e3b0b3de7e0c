"""A real Flower simulation with one site slower than the round deadline.

The slow site is made slow by this test's own ClientApp, which wraps fedseg's:
there is no switch for it in the product, so no server message can trigger it.
The same wrapper keeps a copy of every update a site sends, so the test can check
which updates the round's model was averaged from, and holds site-a's round-3
training until the straggler's round-2 reply is out, so that the late reply
lands while the run is still there to record it. The straggler waits until round
2, when every site's process has started: round 1 includes starting Ray's workers,
which on a busy machine can itself outlast a deadline (``round-retries`` then
repeats round 1, which this test does not look at).
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest

from server.history import MetricsHistory
from shared.checkpoint import Checkpoint
from shared.run_files import RunFiles
from simulations.phantoms import write_synthetic_federation
from simulations.simulate import SYNTHETIC_2D, build_run_values, simulated_sites

pytestmark = [pytest.mark.e2e, pytest.mark.faults]

DEADLINE = 60.0
#: The slow site's extra time in round 1's training, well past the deadline.
DELAY = DEADLINE + 20.0
SLOW = 2  # partition id of site-c, slow in round 2
HOLD = 0  # partition id of site-a, held in round 3 until the late reply is out


def test_a_site_slower_than_the_deadline_is_left_out_and_its_late_reply_recorded(
        tmp_path: Path) -> None:
    from flwr.app import Context, Message
    from flwr.clientapp import ClientApp
    from flwr.simulation import run_simulation

    from client.app import make_client_app
    from server.app import make_server_app
    from server.report import LineReporter

    folders = write_synthetic_federation(tmp_path / "data", num_sites=3, cases_per_site=6,
                                         shape=(32, 32), seed=1)
    run_dir = tmp_path / "run"
    sites = simulated_sites(folders, run_dir)
    values = build_run_values(SYNTHETIC_2D, {
        "num-server-rounds": 3, "local-steps": 2, "batch-size": 2, "channels": "8,16",
        "patch-size": "32,32", "min-train-nodes": 2, "min-evaluate-nodes": 2,
        "round-timeout": DEADLINE, "round-retries": 3}, len(sites), run_dir)
    updates = tmp_path / "updates"
    updates.mkdir()
    inner = make_client_app(lambda ctx: sites[int(ctx.node_config["partition-id"])])
    app = ClientApp()

    @app.train()
    def train(msg: Message, ctx: Context) -> Message:
        partition = int(ctx.node_config["partition-id"])
        rnd = int(msg.content.config_records["config"]["server-round"])
        if partition == SLOW and rnd == 2:
            time.sleep(DELAY)
        if partition == HOLD and rnd == 3:
            limit = time.monotonic() + DEADLINE - 15
            while not (updates / f"round2-site{SLOW}.npz").exists() and (
                    time.monotonic() < limit):
                time.sleep(0.5)
            time.sleep(5.0)  # for the straggler's reply to reach the server's next pull
        reply = inner(msg, ctx)
        if not reply.has_error():
            arrays = {k: v.numpy() for k, v in reply.content.array_records["arrays"].items()}
            weight = float(reply.content.metric_records["metrics"]["num-examples"])
            np.savez(updates / f"round{rnd}-site{partition}.npz", __weight__=weight, **arrays)
        return reply

    @app.evaluate()
    def evaluate(msg: Message, ctx: Context) -> Message:
        return inner(msg, ctx)

    lines: list[str] = []
    started = time.monotonic()
    run_simulation(
        server_app=make_server_app(run_dir=run_dir, reporter=LineReporter(lines.append),
                                   run_config=values, echo=lines.append),
        client_app=app, num_supernodes=len(sites),
        backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0},
                        # Two workers: one may sleep, the other serves every other site.
                        "init_args": {"num_cpus": 2, "num_gpus": 0,
                                      "include_dashboard": False}})
    wall = time.monotonic() - started

    files = RunFiles(run_dir)
    history = MetricsHistory.read(files.metrics_json)
    slow = history.rounds[1]
    print(f"straggler e2e: deadline {DEADLINE:g} s, straggler +{DELAY:g} s; round 2 training "
          f"took {slow.train_seconds:.1f} s, evaluation {slow.evaluate_seconds:.1f} s; "
          f"round 1 attempts {history.rounds[0].retries + 1}; whole simulation {wall:.1f} s")
    assert [r.round for r in history.rounds] == [1, 2, 3], lines
    assert all(r.aggregated for r in history.rounds), history.rounds
    assert slow.retries == 0 and history.rounds[2].retries == 0, history.rounds
    assert files.final_model.is_file()
    # Not a timing test: only a hang would take longer than this.
    assert slow.train_seconds is not None and slow.train_seconds <= DEADLINE + 30
    by_site = {s.site: s for s in slow.sites}
    assert by_site["site-a"].error is None and by_site["site-b"].error is None
    late = by_site["site-c"]
    assert late.error is not None and (
        "train: late reply after round-timeout, not aggregated" in late.error), late
    assert late.num_train_cases is None and late.train_loss is None

    # Round 2's model is exactly the average of a's and b's updates; c's, which it did
    # send (late), would have moved it.
    def update(name: str) -> tuple[float, dict[str, np.ndarray]]:
        with np.load(updates / name) as saved:
            return float(saved["__weight__"]), {k: saved[k] for k in saved.files
                                                if k != "__weight__"}

    (wa, a), (wb, b), (wc, c) = (update(f"round2-site{n}.npz") for n in range(3))
    model = Checkpoint.load(files.checkpoint(2)).weights
    assert sorted(model) == sorted(a)
    for key in model:
        expected = (wa * a[key].astype(np.float64) + wb * b[key]) / (wa + wb)
        np.testing.assert_allclose(model[key], expected, rtol=1e-5, atol=1e-6, err_msg=key)
    with_c = {k: (wa * a[k] + wb * b[k] + wc * c[k]) / (wa + wb + wc) for k in model}
    assert max(float(np.abs(model[k] - with_c[k]).max()) for k in model) > 1e-4
