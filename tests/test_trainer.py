"""The framework-free site trainer on small synthetic sites."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from client.averaging import ParameterAverage
from client.config import SiteConfig
from client.trainer import SiteTrainer
from server.config import RunConfig
from shared.config import ModelSpec, TrainPlan
from simulations.phantoms import write_synthetic_federation

SPEC = ModelSpec(channels=(8, 16, 32), patch_size=(32, 32))


@pytest.fixture(scope="module")
def site_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("sites")
    return write_synthetic_federation(root, num_sites=1, cases_per_site=8, shape=(48, 48))[0]


def trainer(site_dir: Path) -> SiteTrainer:
    # Its state (and disk cache) beside the data, not in the working directory.
    return SiteTrainer(SiteConfig(data_path=site_dir, val_fraction=0.25, device="cpu",
                                  num_threads=1, state_dir=site_dir.parent / "state"), SPEC)


def distance(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> float:
    return float(sum(np.sum((a[k] - b[k]) ** 2) for k in a))


def test_num_examples_counts_cases_not_batches(site_dir: Path) -> None:
    t = trainer(site_dir)
    assert (len(t.data.train), len(t.data.val)) == (6, 2)
    result = t.train(t.weights(), TrainPlan(local_steps=3, batch_size=4))
    assert result.num_examples == 6
    assert result.steps == 3
    assert t.steps_for(TrainPlan(local_epochs=2, batch_size=4)) == 4  # 2 * ceil(6 / 4)


def test_training_is_deterministic_for_a_seed(site_dir: Path) -> None:
    t = trainer(site_dir)
    start = t.weights()
    plan = TrainPlan(local_steps=2, batch_size=4, seed=5)
    first = t.train(start, plan).weights
    second = t.train(start, plan).weights
    other = t.train(start, TrainPlan(local_steps=2, batch_size=4, seed=6)).weights
    assert distance(first, second) == 0.0
    assert distance(first, other) > 0.0


def test_fedprox_term_pulls_local_weights_towards_global(site_dir: Path) -> None:
    t = trainer(site_dir)
    start = t.weights()
    plain = t.train(start, TrainPlan(local_steps=4, batch_size=4, learning_rate=0.01))
    prox = t.train(start, TrainPlan(local_steps=4, batch_size=4, learning_rate=0.01,
                                    proximal_mu=100.0))
    assert distance(plain.weights, prox.weights) > 0.0
    assert distance(prox.weights, start) < distance(plain.weights, start)


def test_evaluate_scores_every_validation_case(site_dir: Path) -> None:
    t = trainer(site_dir)
    result = t.evaluate(t.weights())
    assert result.num_examples == 2
    assert sorted(result.per_case) == sorted(c.case_id for c in t.data.val)
    assert all(0.0 <= d <= 1.0 for d in result.per_case.values())
    case = t.data.val[0]
    assert t.predict(t.weights(), case.image).shape == case.label.shape


def test_weights_of_another_model_are_refused(site_dir: Path) -> None:
    t = trainer(site_dir)
    with pytest.raises(ValueError, match="same model settings"):
        t.train({"foo": np.zeros(1)}, TrainPlan(local_steps=1))


def test_weight_decay_shrinks_weights_and_travels_in_the_round_config(site_dir: Path) -> None:
    t = trainer(site_dir)
    start = t.weights()
    plain = t.train(start, TrainPlan(local_steps=3, batch_size=4, learning_rate=0.01))
    decayed = t.train(start, TrainPlan(local_steps=3, batch_size=4, learning_rate=0.01,
                                       weight_decay=5.0))
    norm = lambda w: float(sum(np.sum(v ** 2) for v in w.values()))  # noqa: E731
    assert norm(decayed.weights) < norm(plain.weights)
    sent = RunConfig.from_user_config({"weight-decay": 0.01}).round_config(1)
    assert sent["weight-decay"] == 0.01 and TrainPlan.from_config(sent).weight_decay == 0.01


def test_parameter_average_has_exact_values_from_the_first_iterate() -> None:
    p = torch.nn.Parameter(torch.tensor([0.0, 10.0]))
    average = ParameterAverage({"p": p}, decay=0.75)
    average.copy_to_parameters()  # nothing averaged yet: unchanged
    assert p.tolist() == [0.0, 10.0]
    with torch.no_grad():
        for value in ([4.0, 8.0], [8.0, 0.0], [0.0, 4.0]):
            p.copy_(torch.tensor(value))
            average.update()
    # 4 -> 0.75 * 4 + 0.25 * 8 = 5 -> 0.75 * 5 + 0.25 * 0 = 3.75;
    # 8 -> 0.75 * 8 + 0.25 * 0 = 6 -> 0.75 * 6 + 0.25 * 4 = 5.5.
    average.copy_to_parameters()
    assert p.tolist() == [3.75, 5.5]
    with pytest.raises(ValueError, match="decay"):
        ParameterAverage({"p": p}, decay=1.0)


def test_ema_decay_sends_the_average_and_travels_in_the_round_config(site_dir: Path) -> None:
    t = trainer(site_dir)
    start = t.weights()
    plan = TrainPlan(local_steps=3, batch_size=4, learning_rate=0.01, seed=2)
    last = t.train(start, plan).weights
    averaged = t.train(start, replace(plan, ema_decay=0.5)).weights
    assert distance(last, averaged) > 0.0
    # One step: the average is that step's parameters.
    one = replace(plan, local_steps=1)
    assert distance(t.train(start, one).weights,
                    t.train(start, replace(one, ema_decay=0.5)).weights) == 0.0
    sent = RunConfig.from_user_config({"ema-decay": 0.9}).round_config(1)
    assert sent["ema-decay"] == 0.9 and TrainPlan.from_config(sent).ema_decay == 0.9
