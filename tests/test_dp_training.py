"""DP-SGD training: patients as sampling units, augmentation multiplicity, one loop."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from opacus.accountants import RDPAccountant
from torch import nn

from client.accounting import sample_rate
from client.augment import PatchDataset, UnitDataset
from client.config import SiteConfig
from client.losses import patch_losses
from client.privacy_ledger import PrivacyLedger
from client.private_gradients import GRAD_SAMPLE_MODES, PrivateStep, trainable
from client.trainer import PrivateGradient, SiteTrainer
from shared.config import ModelSpec, TrainPlan
from shared.privacy import PrivacyRequest, SitePrivacy, resolve_privacy
from simulations.phantoms import write_synthetic_federation

SPEC = ModelSpec(channels=(8, 16), patch_size=(16, 16))


@pytest.fixture(scope="module")
def paired_site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Eight cases of four patients, two cases each (``"patient"`` in dataset.json)."""
    root = tmp_path_factory.mktemp("paired")
    site = write_synthetic_federation(root, num_sites=1, cases_per_site=8, shape=(32, 32))[0]
    spec = json.loads((site / "dataset.json").read_text())
    for i, entry in enumerate(sorted(spec["training"], key=lambda e: e["image"])):
        entry["patient"] = f"patient-{i // 2}"
    (site / "dataset.json").write_text(json.dumps(spec))
    return site


def dp_site(folder: Path, state: Path, **kwargs: object) -> SiteConfig:
    privacy = {"noise_multiplier": 1.1, **{k: v for k, v in kwargs.items()
                                          if k != "dp_grad_sample_mode"}}
    return SiteConfig(data_path=folder, state_dir=state, device="cpu", num_threads=1,
                      val_fraction=0.25, privacy=SitePrivacy(enabled=True, **privacy),  # type: ignore[arg-type]
                      dp_grad_sample_mode=str(kwargs.get("dp_grad_sample_mode", "vmap")))


def private(site: SiteConfig) -> object:
    return resolve_privacy(site.privacy, PrivacyRequest())


def distance(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> float:
    return float(sum(np.sum((a[k] - b[k]) ** 2) for k in a))


# (a) The patient is the sampling unit, and the ledger is Opacus's accountant.

def test_patients_are_the_sampling_units_and_set_the_rate(paired_site: Path,
                                                          tmp_path: Path) -> None:
    site = dp_site(paired_site, tmp_path)
    trainer = SiteTrainer(site, SPEC)
    units = trainer.patient_units()
    # 1 of 4 patients is held out; 3 patients, 6 training cases.
    assert trainer.num_train_cases == 6
    assert [len(u) for u in units] == [2, 2, 2]
    assert {trainer.data.train[i].patient_id for u in units for i in u} == {
        c.patient_id for c in trainer.data.train}
    assert all(len({trainer.data.train[i].patient_id for i in u}) == 1 for u in units)
    result = trainer.train(trainer.weights(), TrainPlan(local_steps=3, batch_size=2),
                           private(site))  # type: ignore[arg-type]
    rate = 2 / 3  # expected batch 2 of 3 patients (per case it would be 2 / 6)
    accountant = RDPAccountant()
    for _ in range(3):
        accountant.step(noise_multiplier=1.1, sample_rate=rate)
    assert result.steps == 3 and result.num_examples == 6
    assert result.epsilon == accountant.get_epsilon(delta=1e-5)
    assert PrivacyLedger.load(tmp_path).history == [(1.1, rate, 3)]
    # Noise 1.1 x clipping norm 1.0 over the expected 2 patients of a batch.
    assert result.noise_std == 1.1 * 1.0 / (rate * 3)
    # Epochs under DP count passes over patients: ceil(3 / 2) steps, not ceil(6 / 2).
    assert trainer.steps_for(TrainPlan(batch_size=2), len(units)) == 2


def test_calibration_uses_the_patient_rate(paired_site: Path, tmp_path: Path) -> None:
    from client.accounting import calibrate_noise

    site = dp_site(paired_site, tmp_path, noise_multiplier=0.0, target_epsilon=4.0,
                   planned_rounds=2)
    trainer = SiteTrainer(site, SPEC)
    trainer.train(trainer.weights(), TrainPlan(local_steps=2, batch_size=1),
                  private(site))  # type: ignore[arg-type]
    assert PrivacyLedger.load(tmp_path).calibrated_noise == calibrate_noise(
        4.0, 1e-5, 1 / 3, 4, "rdp")


def test_sample_rate_is_expected_batch_over_units() -> None:
    assert sample_rate(2, 6) == 1 / 3
    assert sample_rate(2, 3) == 2 / 3
    assert sample_rate(8, 5) == 1.0  # a batch cannot expect more units than exist
    with pytest.raises(ValueError, match="at least one unit"):
        sample_rate(2, 0)


def test_a_unit_draws_its_patches_from_each_of_its_cases_in_turn() -> None:
    images = [np.full((1, 4, 4), float(i), dtype=np.float32) for i in range(3)]
    labels = [np.zeros((4, 4), dtype=np.int64)] * 3
    patches = PatchDataset(images, labels, (4, 4), seed=0, whole_image=True, augment=False)
    units = UnitDataset(patches, [[0, 2], [1]], draws=4, seed=0)
    assert len(units) == 2
    image, label = units[0]
    assert image.shape == (4, 1, 4, 4) and label.shape == (4, 1, 4, 4)
    drawn = sorted(float(image[k].mean()) for k in range(4))
    assert drawn == [0.0, 0.0, 2.0, 2.0]
    assert {float(units[1][0][k].mean()) for k in range(4)} == {1.0}


# (b) A unit's gradient is the mean of its patches' gradients; clipping bounds it.

class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.norm = nn.GroupNorm(2, 4)
        self.head = nn.Conv2d(4, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.norm(self.conv(x))))


def _no_cast() -> torch.autocast:
    return torch.autocast("cpu", enabled=False)


def batch(units: int = 3, draws: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(units, draws, 1, 6, 6, generator=generator)
    labels = (torch.rand(units, draws, 1, 6, 6, generator=generator) > 0.6).long()
    return images, labels


def patch_mean_gradients(net: nn.Module, images: torch.Tensor,
                         labels: torch.Tensor) -> list[dict[str, torch.Tensor]]:
    """Each unit's gradient by hand: the mean over its patches of each patch's gradient."""
    out = []
    for u in range(images.shape[0]):
        total: dict[str, torch.Tensor] = {}
        for k in range(images.shape[1]):
            net.zero_grad()
            patch_losses(net(images[u, k:k + 1]), labels[u, k:k + 1]).sum().backward()
            for n, p in trainable(net).items():
                assert p.grad is not None
                total[n] = total.get(n, 0) + p.grad / images.shape[1]
        out.append(total)
    return out


@pytest.mark.parametrize("mode", GRAD_SAMPLE_MODES.names())
def test_unit_gradient_is_the_mean_of_its_patch_gradients(mode: str) -> None:
    torch.manual_seed(0)
    net = Tiny()
    net.conv.bias.requires_grad_(False)  # frozen: no per-unit gradient at all
    images, labels = batch()
    expected = patch_mean_gradients(net, images, labels)
    net.zero_grad()
    losses = GRAD_SAMPLE_MODES[mode](net, _no_cast)(images, labels)
    assert losses.shape == (3,)
    assert not hasattr(net.conv.bias, "grad_sample") or net.conv.bias.grad_sample is None
    for name, p in trainable(net).items():
        assert p.grad_sample.shape == (3, *p.shape)
        for u in range(3):
            torch.testing.assert_close(p.grad_sample[u], expected[u][name], rtol=1e-5,
                                       atol=1e-6)


def test_opacus_clips_each_unit_and_adds_nothing_without_noise() -> None:
    torch.manual_seed(0)
    net = Tiny()
    images, labels = batch()
    expected = patch_mean_gradients(net, images, labels)
    clip = 0.05
    optimiser = torch.optim.SGD(trainable(net).values(), lr=0.1)
    step = PrivateStep.wrap(optimiser, noise_multiplier=0.0, max_grad_norm=clip,
                            expected_units=2.0, sample_rate=0.5, accountant="rdp")
    loss = PrivateGradient(GRAD_SAMPLE_MODES["vmap"](net, _no_cast), step)(images, labels)
    assert loss is not None and torch.isfinite(loss)
    norms = [torch.sqrt(sum((g ** 2).sum() for g in unit.values())) for unit in expected]
    assert all(n > clip for n in norms)  # every unit is clipped here
    for name, p in trainable(net).items():
        assert p.grad is not None
        by_hand = sum(expected[u][name] * min(1.0, clip / (float(norms[u]) + 1e-6))
                      for u in range(3)) / 2.0  # divided by the expected number of units
        torch.testing.assert_close(p.grad, by_hand, rtol=1e-5, atol=1e-8)
    # Each unit's contribution is at most the clipping norm.
    clipped = [min(1.0, clip / (float(n) + 1e-6)) * float(n) for n in norms]
    assert max(clipped) <= clip
    assert step.steps() == 1 and step.accountant.history == [(0.0, 0.5, 1)]


def test_an_empty_poisson_batch_is_a_noise_only_step() -> None:
    torch.manual_seed(0)
    net = Tiny()
    optimiser = torch.optim.SGD(trainable(net).values(), lr=0.1)
    step = PrivateStep.wrap(optimiser, noise_multiplier=1.0, max_grad_norm=1.0,
                            expected_units=2.0, sample_rate=0.5, accountant="rdp")
    images, labels = batch(units=0)
    assert PrivateGradient(GRAD_SAMPLE_MODES["vmap"](net, _no_cast), step)(images, labels) is None
    grads = torch.cat([p.grad.flatten() for p in trainable(net).values()
                       if p.grad is not None])
    assert grads.numel() == sum(p.numel() for p in net.parameters())
    assert float(grads.abs().min()) > 0.0  # noise std 1.0 * 1.0 / 2 on every coordinate
    assert step.steps() == 1


# (c) Plain training and DP-SGD run the same loop.

def test_plain_and_private_rounds_go_through_one_loop(paired_site: Path, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []
    original = SiteTrainer._optimise

    def spy(self: SiteTrainer, *args: object, **kwargs: object) -> list[float]:
        calls.append(type(args[5]).__name__)
        return original(self, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(SiteTrainer, "_optimise", spy)
    site = dp_site(paired_site, tmp_path)
    trainer = SiteTrainer(site, SPEC)
    trainer.train(trainer.weights(), TrainPlan(local_steps=1, batch_size=2))
    trainer.train(trainer.weights(), TrainPlan(local_steps=1, batch_size=2),
                  private(site))  # type: ignore[arg-type]
    assert calls == ["PlainGradient", "PrivateGradient"]


@pytest.mark.parametrize(("dp", "key"), [(False, "learning-rate"), (True, "dp-learning-rate")])
def test_non_finite_loss_stops_plain_and_private_training(paired_site: Path, tmp_path: Path,
                                                          dp: bool, key: str) -> None:
    site = dp_site(paired_site, tmp_path)
    trainer = SiteTrainer(site, SPEC)
    plan = TrainPlan(local_steps=4, batch_size=3, learning_rate=1e30, dp_learning_rate=1e30)
    with pytest.raises(FloatingPointError, match=f"; lower {key} in the run config"):
        trainer.train(trainer.weights(), plan,
                      private(site) if dp else None)  # type: ignore[arg-type]
    if dp:  # the failed round released nothing and recorded nothing
        assert PrivacyLedger.load(tmp_path).history == []


def test_fedprox_pulls_private_training_towards_the_global_weights(paired_site: Path,
                                                                   tmp_path: Path) -> None:
    site = dp_site(paired_site, tmp_path, noise_multiplier=0.5)
    trainer = SiteTrainer(site, SPEC)
    start = trainer.weights()
    plan = TrainPlan(local_steps=4, batch_size=2, dp_learning_rate=0.01)
    free = trainer.train(start, plan, private(site))  # type: ignore[arg-type]
    pulled = trainer.train(start, replace(plan, proximal_mu=20.0),
                           private(site))  # type: ignore[arg-type]
    # Same seed, so the same patients and the same noise: only the proximal term differs.
    assert 0.0 < distance(pulled.weights, start) < distance(free.weights, start)
    assert pulled.epsilon is not None and free.epsilon is not None
    assert pulled.epsilon > free.epsilon  # two rounds spent


# (d) Frozen parameters never move under DP-SGD.

@pytest.mark.parametrize("mode", ["vmap", "hooks"])
def test_frozen_parameters_are_bit_identical_after_a_private_round(
        paired_site: Path, tmp_path: Path, mode: str) -> None:
    site = dp_site(paired_site, tmp_path, dp_grad_sample_mode=mode)
    trainer = SiteTrainer(site, SPEC)
    start = trainer.weights()
    # dp-trainable 'decoder' freezes the encoder; its parameters must not move.
    result = trainer.train(start, TrainPlan(local_steps=2, batch_size=2, trainable="decoder"),
                           private(site))  # type: ignore[arg-type]
    frozen = set(start) - set(result.weights)
    assert frozen
    after = trainer.weights()
    for name in frozen:
        assert np.array_equal(after[name], start[name]), name
    assert any(not np.array_equal(result.weights[n], start[n]) for n in result.weights)


def test_a_dp_site_reports_its_patients_in_its_fingerprint(paired_site: Path,
                                                           tmp_path: Path) -> None:
    from client.fingerprint import fingerprint_site

    plain = SiteConfig(data_path=paired_site, state_dir=tmp_path / "plain", val_fraction=0.25)
    # 3 training patients of two cases each: patients, not cases, are counted.
    assert fingerprint_site(dp_site(paired_site, tmp_path / "dp")).dp_patients == 3
    assert fingerprint_site(dp_site(paired_site, tmp_path / "dp")).num_cases == 6
    assert fingerprint_site(plain).dp_patients == 0
