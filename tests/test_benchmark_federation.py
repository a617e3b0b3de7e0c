"""The one evaluation command (issue 10): every method, several seeds, equal steps per site."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import pytest

from benchmarks.federation import (
    FEDERATED,
    METHODS,
    MethodRun,
    acceptance,
    budget_notes,
    main,
    method_rounds,
    method_steps,
    method_values,
    plan_budget,
    summarise,
    train_alone,
)
from client.config import SiteConfig
from server.app import initial_weights
from server.config import RunConfig
from shared.partition import ADAPTATIONS
from shared.personalization import PERSONALIZATIONS
from shared.planning import Fingerprint, make_plan
from simulations.phantoms import write_synthetic_federation
from simulations.sites import find_site_folders

TINY = ["--rounds", "1", "--local-steps", "2", "--run-config", "channels='8,16' batch-size=2"]


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("bench-sites")
    write_synthetic_federation(root, num_sites=2, cases_per_site=5, shape=(32, 32))
    return root


def _run(dice: dict[str, float], steps: dict[str, int]) -> MethodRun:
    cross = {"sites": list(dice), "models": ["global"],
             "dice": [[v] for v in dice.values()], "hd95": [[1.0]] * len(dice),
             "asd": [[None]] * len(dice)}
    return MethodRun([dice], steps, cross, 0.0)


def test_every_site_local_mode_is_a_method() -> None:
    assert METHODS[:4] == ("local-only", "pooled", "fedavg", "fedprox")
    assert {m for m in ADAPTATIONS if m != "none"} <= set(FEDERATED)
    assert {m for m in PERSONALIZATIONS if m != "none"} <= set(FEDERATED)
    assert "local-head" in FEDERATED


def test_the_plans_fine_tune_rounds_go_back_into_every_methods_budget() -> None:
    thin = Fingerprint(num_cases=20, spatial_dims=2, channels=3, shape=(584, 568),
                       spacing=(1.0, 1.0), has_spacing=False, foreground_fraction=0.1,
                       thickness=6.0, dark_fraction=0.3, fg_intensity=(0.0, 0.5, 1.0))
    plan = make_plan([thin])
    assert (plan.num_server_rounds, plan.local_steps, plan.finetune_steps) == (25, 150, 750)
    budget = plan_budget(plan)
    assert budget == {**plan.to_run_config(), "num-server-rounds": 30,
                      "personalization": "none"}
    # ... so the fine-tuning method runs the plan's own 25 rounds.
    assert method_rounds("finetune", budget, 30, 150) == 25
    private = make_plan([replace(thin, dp_patients=16)])
    assert plan_budget(private) == private.to_run_config()
    # --rounds and --local-steps: the fine-tune keeps its share (5 of 30), one round at least.
    quick = plan_budget(plan, 6, 20)
    assert (quick["num-server-rounds"], quick["local-steps"], quick["finetune-steps"]) == (
        6, 20, 20)
    assert method_rounds("finetune", quick, 6, 20) == 5
    assert plan_budget(plan, 60)["finetune-steps"] == 1500
    assert plan_budget(plan, 30, 150) == budget
    # A budget of one round leaves none to take; none at all is the parser's to refuse.
    assert plan_budget(plan, 1)["finetune-steps"] == 0
    assert plan_budget(plan, 0)["finetune-steps"] == 750
    assert plan_budget(private, 6)["finetune-steps"] == 0


def test_ditto_splits_the_budget_and_finetune_takes_its_steps_out_of_it() -> None:
    values = {"local-steps": 7, "finetune-steps": 5}
    assert method_values("ditto", values, 4, 7) == {
        "local-steps": 3, "finetune-steps": 5, "strategy": "fedavg", "personalization": "ditto"}
    # 5 fine-tuning steps take one whole round of 7 out of the 4.
    assert method_values("finetune", values, 4, 7) == {
        "local-steps": 7, "finetune-steps": 5, "strategy": "fedavg",
        "personalization": "finetune", "num-server-rounds": 3}
    assert method_rounds("finetune", values, 4, 7) == 3
    assert method_rounds("finetune", {"local-steps": 7, "finetune-steps": 15}, 4, 7) == 1
    # finetune-steps 0 means one round's steps: one round.
    assert method_rounds("finetune", {"local-steps": 7}, 4, 7) == 3
    assert method_rounds("fedavg", values, 4, 7) == 4
    assert method_steps("ditto", values, 4, 8) == method_steps("fedavg", values, 4, 8) == 32
    assert method_steps("ditto", values, 4, 7) == 24
    assert method_steps("finetune", values, 4, 7) == 21
    notes = budget_notes(["fedavg", "ditto", "finetune"], values, 4, 7)
    assert notes == {
        "ditto": "each round 3 steps of the global model + 3 of the personal one = 24 steps per "
                 "site (one fewer per round than the others: local-steps is odd)",
        "finetune": "3 rounds (21 steps), then 5 fine-tuning steps of a copy of the global model "
                    "before the last evaluation: the deployed model has had 26 steps",
    }
    every = budget_notes(["finetune"], {"local-steps": 7, "finetune-rounds": "all"}, 4, 7)
    assert every["finetune"] == (
        "3 rounds (21 steps), then 7 fine-tuning steps of a copy of the global model before each "
        "evaluation (the last one is deployed): the deployed model has had 28 steps")


def test_a_budget_with_no_round_left_to_federate_is_refused(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["--seeds", "1", "--methods", "finetune", "--output", str(tmp_path / "out"),
              *TINY])
    assert "finetune takes its fine-tuning steps out of the budget of 1 rounds" in (
        capsys.readouterr().err)


def test_summary_is_mean_and_sample_std_over_seeds_and_differences_per_site() -> None:
    sites = ["a", "b"]
    steps = {"a": 4, "b": 4}
    runs = {
        "local-only": [_run({"a": 0.5, "b": 0.7}, steps), _run({"a": 0.7, "b": 0.7}, steps)],
        "pooled": [_run({"a": 0.8, "b": 0.8}, {"pooled": 8})] * 2,
        "fedavg": [_run({"a": 0.6, "b": 0.8}, steps), _run({"a": 0.8, "b": 0.8}, steps)],
    }
    summary = summarise(runs, sites)
    local = summary["local-only"]["dice"]
    assert local["a"]["mean"] == pytest.approx(0.6)
    assert local["a"]["std"] == pytest.approx(math.sqrt(0.02))  # sample std of 0.5, 0.7
    assert local["b"]["std"] == 0.0
    # The mean over sites is taken per seed, then over seeds: (0.6, 0.7).
    assert local["mean"]["mean"] == pytest.approx(0.65)
    assert local["mean"]["std"] == pytest.approx(math.sqrt(0.005))
    assert summary["fedavg"]["vs_local_only"]["a"] == pytest.approx(0.1)
    assert summary["fedavg"]["vs_pooled"]["mean"] == pytest.approx(-0.05)
    assert summary["fedavg"]["cross_site"]["dice"] == [[pytest.approx(0.7)], [0.8]]
    assert summary["fedavg"]["cross_site"]["asd"] == [[None], [None]]
    verdict = acceptance(summary, sites)
    assert verdict is not None and verdict["best_federated"] == "fedavg"
    assert verdict["at_least_local_only_on_every_site"]
    assert not verdict["within_pooled_margin"]


def test_baselines_over_two_seeds_write_json_markdown_and_png(data: Path,
                                                              tmp_path: Path) -> None:
    out = tmp_path / "bench"
    assert main(["--data", str(data), "--seeds", "2", "--methods", "local-only", "pooled",
                 "--output", str(out), *TINY]) == 0
    assert {p.name for p in out.glob("federation.*")} == {
        "federation.json", "federation.md", "federation.png"}
    assert (out / "federation.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = json.loads((out / "federation.json").read_text())
    sites = report["sites"]
    assert sites == ["site-a", "site-b"] and report["seeds"] == [0, 1]
    for method in ("local-only", "pooled"):
        dice = report["summary"][method]["dice"]
        for column in [*sites, "mean"]:
            assert 0.0 <= dice[column]["mean"] <= 1.0 and dice[column]["std"] >= 0.0
        assert len(report["runs"][method]) == 2
    assert report["budget"] == {"rounds": 1, "local_steps": 2, "steps_per_site": 2,
                                "pooled_steps": 4}
    assert report["equal_steps"]
    assert report["runs"]["pooled"][0]["steps"] == {"pooled": 4}
    # Each site's own model is evaluated on every site.
    cross = report["summary"]["local-only"]["cross_site"]
    assert cross["models"] == ["site-a local", "site-b local"]
    assert len(cross["dice"]) == 2 and all(len(row) == 2 for row in cross["dice"])
    text = (out / "federation.md").read_text()
    assert "| method | site-a | site-b | mean |" in text
    assert text.count(" ± ") >= 6
    assert "| pooled | +" in text  # the difference table


def test_resume_keeps_the_finished_seeds_and_runs_the_rest(
        data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import benchmarks.federation as bench

    trained: list[int] = []

    def fake(folders: object, config: RunConfig, pooled: bool, state: Path) -> MethodRun:
        seed = config.training.seed
        trained.append(seed)
        return _run({"site-a": 0.5 + seed / 10, "site-b": 0.6}, {"site-a": 2, "site-b": 2})

    monkeypatch.setattr(bench, "centralised", fake)
    out = tmp_path / "bench"
    args = ["--data", str(data), "--methods", "local-only", "--output", str(out), *TINY]
    assert main([*args, "--seeds", "1"]) == 0
    assert main([*args, "--seeds", "3", "--resume"]) == 0
    assert trained == [0, 1, 2]  # seed 0 once, from the first run's report
    report = json.loads((out / "federation.json").read_text())
    assert report["seeds"] == [0, 1, 2]
    assert [r["per_round"][0]["site-a"] for r in report["runs"]["local-only"]] == [
        0.5, 0.6, 0.7]
    # A report written before a run-config key existed (its default) is resumed.
    older = json.loads((out / "federation.json").read_text())
    del older["run_config"]["downsample"]
    (out / "federation.json").write_text(json.dumps(older))
    assert main([*args, "--seeds", "3", "--resume"]) == 0
    assert trained == [0, 1, 2]
    # Another run config is not resumed: its kept runs would have had another budget.
    with pytest.raises(SystemExit):
        main([*args, "--seeds", "3", "--resume", "--run-config", "learning-rate=0.01"])
    (out / "federation.json").write_text("[]")
    with pytest.raises(SystemExit):
        main([*args, "--seeds", "3", "--resume"])


def test_sites_alone_in_their_own_processes_train_as_in_this_one(data: Path,
                                                                  tmp_path: Path) -> None:
    out = tmp_path / "bench"
    assert main(["--data", str(data), "--seeds", "1", "--methods", "local-only",
                 "--output", str(out), *TINY]) == 0
    report = json.loads((out / "federation.json").read_text())
    config = RunConfig.from_user_config({**report["run_config"], "seed": 0})
    folders = find_site_folders(data)
    site = SiteConfig(data_path=folders[1], site_name=folders[1].name,
                      state_dir=tmp_path / "alone", seed=1, num_threads=1)
    alone = train_alone(site, config, initial_weights(config))
    assert alone.steps == 2
    # Bit-identical: the site's process draws the same patches from the same weights.
    assert report["runs"]["local-only"][0]["per_round"][0][folders[1].name] == alone.dice[0]


@pytest.mark.e2e
def test_federated_method_takes_the_same_steps_per_site(data: Path, tmp_path: Path) -> None:
    out = tmp_path / "bench"
    assert main(["--data", str(data), "--seeds", "1", "--methods", "local-only", "fedavg",
                 "--output", str(out), *TINY]) == 0
    report = json.loads((out / "federation.json").read_text())
    steps = {m: runs[0]["steps"] for m, runs in report["runs"].items()}
    assert steps["fedavg"] == steps["local-only"] == {"site-a": 2, "site-b": 2}
    assert report["equal_steps"]
    fedavg = report["summary"]["fedavg"]
    assert fedavg["cross_site"]["models"] == ["global"]
    assert fedavg["vs_local_only"].keys() == {"site-a", "site-b", "mean"}
    assert len(fedavg["per_round"]["mean"]) == 1
    assert "### fedavg" in (out / "federation.md").read_text()


@pytest.mark.e2e
def test_ditto_takes_the_budget_in_two_halves(data: Path, tmp_path: Path) -> None:
    out = tmp_path / "bench"
    assert main(["--data", str(data), "--seeds", "1", "--methods", "ditto",
                 "--output", str(out), *TINY]) == 0
    report = json.loads((out / "federation.json").read_text())
    assert report["runs"]["ditto"][0]["steps"] == {"site-a": 2, "site-b": 2}
    assert report["equal_steps"]
    assert report["summary"]["ditto"]["cross_site"]["models"] == [
        "site-a deployed", "site-b deployed"]
    assert "- ditto: each round 1 steps of the global model + 1 of the personal one" in (
        out / "federation.md").read_text()


@pytest.mark.parametrize("extra, needle", [
    (["--data", "no-such-folder"], "data folder not found"),
    (["--run-config", "channels='7'"], "run config key 'channels'"),
])
def test_bad_input_is_one_line(extra: list[str], needle: str, tmp_path: Path,
                               capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--seeds", "1", "--output", str(tmp_path / "out"), *extra])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if "error" in line]
    assert len(lines) == 1 and needle in lines[0], err
    assert "Traceback" not in err
