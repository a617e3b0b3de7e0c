"""The site trainer: local training, evaluation and prediction on plain weights.

Nothing here knows about Flower. The ClientApp, the simulation, the command line
and the tests all call :class:`SiteTrainer` with NumPy weight dictionaries, so the
learning code is tested once and behaves the same everywhere.
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Iterable, Iterator, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from functools import partial
from typing import Protocol

import numpy as np
import torch
from opacus.utils.uniform_sampler import UniformWithReplacementSampler
from torch.utils.data import DataLoader

from client.accounting import calibrate_noise, sample_rate
from client.augment import PatchDataset, UnitDataset
from client.averaging import ParameterAverage
from client.config import SiteConfig
from client.data_contract import LoadedCase, site_split
from client.inference import Tiling, predict_classes, resolve_device
from client.losses import patch_losses
from client.personal import (
    PersonalStore,
    anchor_of,
    fit,
    refuse_under_dp,
    trainable_copy,
    weights_digest,
)
from client.preprocess import prepared_case
from client.privacy_ledger import PrivacyLedger
from client.private_gradients import (
    GRAD_SAMPLE_MODES,
    Precision,
    PrivateStep,
    UnitGradients,
    trainable,
)
from client.proximal import proximal_term
from client.site_state import load_local_layers, save_local_layers
from shared.config import ModelSpec, TrainPlan
from shared.errors import DataError
from shared.metrics import dice_per_class
from shared.networks import build_network
from shared.partition import local_parameter_names, split_weights
from shared.personalization import PERSONALIZATIONS, finetunes_now
from shared.privacy import PrivacySettings, gradient_noise_std
from shared.schedule import learning_rate
from shared.trainable import trainable_names
from shared.weights import NDArrays, check_compatible, numpy_to_state, state_to_numpy

Batch = tuple[torch.Tensor, torch.Tensor]


class Gradient(Protocol):
    """How one batch becomes ``p.grad``: the only part plain and DP-SGD training differ in."""

    rate_key: str  # the run-config key of the learning rate its optimiser uses

    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor | None:
        """Fill ``p.grad`` from the batch; return its mean loss (``None`` if it was empty)."""


log = logging.getLogger("fedseg.client")

# Measured on Shenzhen at epsilon 8 (README, Differential privacy): SGD with momentum
# beat Adam, whose steps under DP follow the noise it divides by.
DP_MOMENTUM = 0.9


@dataclass(frozen=True)
class SiteData:
    """A site's cases, loaded once and split into training and validation."""

    train: tuple[LoadedCase, ...]
    val: tuple[LoadedCase, ...]

    @classmethod
    def load(cls, site: SiteConfig, spec: ModelSpec) -> SiteData:
        """Read every case of ``site`` through the data contract and split it by patient.

        Prepared cases come from, and go to, the site's disk cache (``site.cache_dir``),
        so a new process (a SuperNode starts one per message) decodes nothing again.
        """
        train_refs, val_refs = site_split(site.data_path, site.patient_pattern,
                                          site.val_fraction)
        # Training cases are resampled once to the planned working size; validation cases keep
        # their own, so Dice is measured against the label as the hospital drew it.
        return cls(
            train=tuple(prepared_case(r, spec, site.cache_dir, working=True) for r in train_refs),
            val=tuple(prepared_case(r, spec, site.cache_dir, working=False) for r in val_refs),
        )


@dataclass(frozen=True)
class TrainResult:
    """What one round of local training produced.

    Attributes
    ----------
    weights : dict of numpy.ndarray
        What leaves the site: the updated shared weights of the round's dp-trainable
        group; empty when the round was refused.
    num_examples : int
        Training cases at this site.
    train_loss : float
        Mean loss over the steps (NaN if none).
    steps : int
        Optimiser steps taken (Poisson batches, empty ones included, under DP).
    epsilon, delta : float or None
        Cumulative privacy spent by this site after the round; ``None`` without DP.
    noise_std : float
        Standard deviation of the DP-SGD noise in each step's mean gradient
        (:func:`shared.privacy.gradient_noise_std`); 0.0 without DP.
    refused : str
        Why the site refused to train this round ("" if it trained).
    """

    weights: NDArrays
    num_examples: int
    train_loss: float
    steps: int
    epsilon: float | None = None
    delta: float | None = None
    refused: str = ""
    noise_std: float = 0.0


@dataclass(frozen=True)
class EvalResult:
    """Validation of one set of weights on the site's held-out cases."""

    dice: float
    per_case: dict[str, float]
    num_examples: int
    #: Mean Dice of each foreground class over the cases (one value for a binary task).
    per_class: tuple[float, ...] = ()


class SiteTrainer:
    """Train, evaluate and predict for one site, starting from given weights.

    Parameters
    ----------
    site : SiteConfig
        The site's own settings.
    spec : ModelSpec
        The shared architecture.
    data : SiteData, optional
        Pre-loaded cases; read from ``site.data_path`` when omitted.
    """

    def __init__(self, site: SiteConfig, spec: ModelSpec, data: SiteData | None = None) -> None:
        self.site = site
        self.spec = spec
        self.device = resolve_device(site.device)
        if site.num_threads:
            torch.set_num_threads(site.num_threads)
        self.data = data if data is not None else SiteData.load(site, spec)
        self.net = build_network(spec).to(self.device)
        self._warned_amp = False
        self._dataset: PatchDataset | None = None
        self.local_names = local_parameter_names(self.net, spec.adaptation)
        # What the last round trained (dp-trainable); None: every parameter.
        self._trained: frozenset[str] | None = None
        if self.local_names:
            _, local = split_weights(state_to_numpy(self.net.state_dict()), self.local_names)
            saved = load_local_layers(site.state_dir, spec.adaptation,
                                      {k: tuple(v.shape) for k, v in local.items()})
            if saved is not None:
                self.net.load_state_dict(numpy_to_state(saved), strict=False)
        self.personal = PERSONALIZATIONS[spec.personalization]
        self.personal_models = PersonalStore(site.state_dir, spec)

    @property
    def num_train_cases(self) -> int:
        """Number of training cases (the weight of this site in FedAvg)."""
        return len(self.data.train)

    def load_weights(self, weights: NDArrays) -> None:
        """Load the shared weights; the site-local layers keep their own values."""
        shared_state, _ = split_weights(self.net.state_dict(), self.local_names)
        check_compatible(shared_state, weights, "weights from the server")
        self.net.load_state_dict(numpy_to_state(weights), strict=False)

    def weights(self) -> NDArrays:
        """Return the shared weights: the only ones that may leave the site."""
        return split_weights(state_to_numpy(self.net.state_dict()), self.local_names)[0]

    def sent_weights(self) -> NDArrays:
        """Return what leaves the site after a round: the shared parameters it trained."""
        shared = self.weights()
        if self._trained is None:
            return shared
        return {k: v for k, v in shared.items() if k in self._trained}

    def _set_trainable(self, mode: str) -> None:
        """Let only ``mode``'s parameters train; the others keep their values bit for bit."""
        names = trainable_names(self.net, self.spec.network, mode)
        for name, param in self.net.named_parameters():
            param.requires_grad_(name in names)
        self._trained = None if mode == "all" else names

    def local_weights(self) -> NDArrays:
        """Return the site-local weights (domain-adaptation layers)."""
        return split_weights(state_to_numpy(self.net.state_dict()), self.local_names)[1]

    def _save_local(self) -> None:
        if self.local_names:
            save_local_layers(self.site.state_dir, self.spec.adaptation, self.local_weights())

    def _patches(self, seed: int) -> PatchDataset:
        """Return the training patches, reseeded for this round.

        Built once per trainer: padding and the foreground indices of every case are
        deterministic, so later rounds only restart the random transforms.
        """
        if self._dataset is None:
            self._dataset = PatchDataset(
                [c.image for c in self.data.train], [c.label for c in self.data.train],
                self.spec.patch_size, seed, whole_image=self.spec.resize == self.spec.patch_size,
                num_classes=self.spec.num_classes)
        else:
            self._dataset.reseed(seed)
        return self._dataset

    def steps_for(self, plan: TrainPlan, units: int | None = None) -> int:
        """Return the optimiser steps ``plan`` asks for at this site.

        ``local_epochs`` counts passes over ``units`` sampling units: the training
        cases by default, the training patients under DP-SGD.
        """
        if plan.local_steps:
            return plan.local_steps
        count = self.num_train_cases if units is None else units
        return plan.local_epochs * math.ceil(count / plan.batch_size)

    def patient_units(self) -> list[list[int]]:
        """Return each training patient's case indices: DP-SGD's sampling units."""
        by_patient: dict[str, list[int]] = {}
        for index, case in enumerate(self.data.train):
            by_patient.setdefault(case.patient_id, []).append(index)
        return [by_patient[p] for p in sorted(by_patient)]

    def train(self, global_weights: NDArrays, plan: TrainPlan,
              privacy: PrivacySettings | None = None) -> TrainResult:
        """Run one round of local training from ``global_weights``.

        Plain training and DP-SGD run the same loop (:meth:`_optimise`); they differ
        in how a batch becomes a gradient and in what is sampled: cases in shuffled
        batches, or patients by Poisson sampling, each giving ``dp_augmentations``
        patches whose mean gradient is clipped as one.

        Parameters
        ----------
        global_weights : dict of numpy.ndarray
            Weights received from the server.
        plan : TrainPlan
            Epochs or steps, batch size, learning rate and FedProx ``mu``.
        privacy : PrivacySettings, optional
            DP-SGD settings already resolved against the site's own; the round is
            refused when it would push the site's epsilon past its maximum.

        Returns
        -------
        TrainResult
            Updated weights, the number of training cases, the mean loss and the
            number of steps taken.
        """
        refuse_under_dp(self.spec, privacy)
        self.load_weights(global_weights)
        self._set_trainable(plan.trainable)
        # Ditto pulls its personal model towards the model received (with the site's layers).
        received = anchor_of(self.net) if self.personal.trains_personal else None
        seed = _mix_seed(plan.seed, self.site.seed, plan.server_round)
        torch.manual_seed(seed)
        if privacy is not None:
            # Locked from reading the spent epsilon until this round's steps are saved:
            # two rounds at once would otherwise both start from the old spending and
            # the later save would drop the other's steps.
            with PrivacyLedger.locked(self.site.state_dir) as ledger:
                return self._train_private(ledger, plan, privacy, seed)
        units = UnitDataset(self._patches(seed), [[i] for i in range(self.num_train_cases)],
                            1, seed)
        loader = DataLoader(units, batch_size=plan.batch_size, shuffle=True,
                            generator=torch.Generator().manual_seed(seed))
        params = trainable(self.net)
        optimiser = _optimiser(params.values(), plan)
        autocast, scaler = self._precision(private=False)
        gradient = PlainGradient(self.net, optimiser, autocast, scaler)
        steps = self.steps_for(plan)
        losses = self._optimise(self.net, loader, steps, plan, optimiser, gradient, scaler)
        self._save_local()
        personal_steps = 0 if received is None else self._train_ditto(received, plan, seed)
        return TrainResult(
            weights=self.sent_weights(), num_examples=self.num_train_cases,
            train_loss=_mean(losses),
            # Ditto's personal steps count too: the site's compute, honestly reported.
            steps=steps + personal_steps,
        )

    def _train_private(self, ledger: PrivacyLedger, plan: TrainPlan, privacy: PrivacySettings,
                       seed: int) -> TrainResult:
        """DP-SGD: Poisson-sampled patients, one clipped gradient each, Gaussian noise.

        The caller holds the ledger's lock.
        """
        units = self.patient_units()
        rate = sample_rate(plan.batch_size, len(units))
        steps = self.steps_for(plan, len(units))
        noise = privacy.noise_multiplier
        if noise == 0:
            if ledger.calibrated_noise is None:
                # Calibrated once and kept, so later rounds cannot drift to less noise.
                ledger.calibrated_noise = calibrate_noise(
                    privacy.target_epsilon, privacy.delta, rate,
                    steps * (privacy.planned_rounds or plan.num_rounds), privacy.accountant)
                ledger.save()
            noise = ledger.calibrated_noise
        spent = ledger.epsilon(privacy.delta, privacy.accountant)
        projected = ledger.epsilon(privacy.delta, privacy.accountant, (noise, rate, steps))
        if projected > privacy.max_epsilon:
            return TrainResult(
                weights={}, num_examples=self.num_train_cases, train_loss=float("nan"),
                steps=0, epsilon=spent, delta=privacy.delta,
                refused=(f"round {plan.server_round} would raise epsilon from {spent:.3f} to "
                         f"{projected:.3f}, above this site's maximum {privacy.max_epsilon:g}"),
            )
        dataset = UnitDataset(self._patches(seed), units, plan.dp_augmentations, seed)
        # Poisson sampling of patients: each is in a batch with probability `rate`,
        # independently, for exactly `steps` batches (some may be empty).
        sampler = UniformWithReplacementSampler(
            num_samples=len(units), sample_rate=rate, steps=steps,
            generator=torch.Generator().manual_seed(seed))
        shape = self._unit_shape(plan.dp_augmentations)
        loader = DataLoader(dataset, batch_sampler=sampler,
                            collate_fn=lambda items: _collate_units(items, shape))
        # A private copy carries Opacus's per-sample state; the site's network stays
        # clean, so parameter names are the same with and without DP.
        net = copy.deepcopy(self.net)
        params = trainable(net)
        private = PrivateStep.wrap(
            _private_optimiser(params.values(), plan), noise_multiplier=noise,
            max_grad_norm=privacy.max_grad_norm, expected_units=rate * len(units),
            sample_rate=rate, accountant=privacy.accountant)
        autocast, scaler = self._precision(private=True)
        per_unit = GRAD_SAMPLE_MODES[self.site.dp_grad_sample_mode](net, autocast)
        gradient = PrivateGradient(per_unit, private)
        losses = self._optimise(net, loader, steps, plan, private.optimiser.original_optimizer,
                                gradient, scaler)
        taken = private.steps()
        if taken != steps:
            raise RuntimeError(f"Opacus's accountant counted {taken} steps, the loop {steps}")
        # The ledger first: a crash before its save then leaves nothing of this round at
        # the site, neither on disk nor in memory, and one after it over-counts (the safe
        # side). Saved after them, local layers trained by uncounted steps could leak
        # through the next round's update.
        epsilon = ledger.epsilon(privacy.delta, privacy.accountant, (noise, rate, taken))
        ledger.record((noise, rate, taken), plan.server_round, epsilon)
        self.net.load_state_dict(net.state_dict())
        self._save_local()
        return TrainResult(
            weights=self.sent_weights(), num_examples=self.num_train_cases,
            train_loss=_mean(losses), steps=taken, epsilon=epsilon, delta=privacy.delta,
            # What Opacus applied, not a recomputation of its inputs.
            noise_std=gradient_noise_std(private.optimiser.noise_multiplier,
                                         private.optimiser.max_grad_norm,
                                         float(private.optimiser.expected_batch_size)),
        )

    def _optimise(self, net: torch.nn.Module, batches: Iterable[Batch], steps: int,
                  plan: TrainPlan, optimiser: torch.optim.Optimizer, gradient: Gradient,
                  scaler: torch.amp.GradScaler) -> list[float]:
        """Run the one training loop, for plain training and DP-SGD alike.

        Per step: the learning rate of the run's schedule, the batch's gradient
        (``gradient``: plain backward, or DP-SGD's clipped and noised per-unit
        gradients), the non-finite-loss guard, FedProx's pull towards the round's
        start, the optimiser step and, with ``ema-decay``, the running average of the
        parameters, which replaces them at the end. An empty Poisson batch is still a step: its
        gradient is the noise alone.

        Returns
        -------
        list of float
            The loss of every non-empty batch (FedProx's term included).
        """
        params = trainable(net)
        mu = plan.proximal_mu
        anchor = {n: p.detach().clone() for n, p in params.items()} if mu > 0 else {}
        average = ParameterAverage(params, plan.ema_decay) if plan.ema_decay > 0 else None
        net.train()
        losses: list[float] = []
        for step, (images, labels) in enumerate(_batches(batches, steps)):
            _set_learning_rate(optimiser, plan, step, steps)
            loss = gradient(images.to(self.device), labels.to(self.device))
            if loss is not None:
                value = float(loss)
                if anchor:
                    with torch.no_grad():
                        value += mu / 2 * float(proximal_term(params.items(), anchor))
                if not math.isfinite(value):
                    raise FloatingPointError(
                        f"site {self.site.site_name}: training loss became {value} in round "
                        f"{plan.server_round}; lower {gradient.rate_key} in the run config")
                losses.append(value)
            if anchor:
                # FedProx's term is data-independent: its gradient mu * (w - w_global)
                # is added after clipping and noise, so it costs no privacy.
                with torch.no_grad():
                    for name, p in params.items():
                        if p.grad is not None:
                            p.grad.add_(p - anchor[name], alpha=mu)
            scaler.step(optimiser)
            scaler.update()
            if average is not None:
                average.update()
        if average is not None:
            average.copy_to_parameters()
        return losses

    def _unit_shape(self, draws: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """Return the shapes of one unit's images and labels: ``(draws, C, *patch)``."""
        patch = self.spec.patch_size
        return (draws, self.spec.in_channels, *patch), (draws, 1, *patch)

    def _precision(self, private: bool) -> tuple[Precision, torch.amp.GradScaler]:
        """Return the autocast context and loss scaler of ``site.amp`` for this round.

        bfloat16 where the GPU has it: no loss scaling, so DP-SGD sees true per-unit
        gradients and no step is skipped. Without bfloat16, float16 needs a loss
        scaler whose overflow-skipped steps depend on the data and whose scaled
        per-unit gradients Opacus would clip at the wrong norm: plain training uses
        it, DP-SGD trains in float32 and says why once.
        """
        off = torch.amp.GradScaler("cuda", enabled=False)
        if not (self.site.amp and self.device.type == "cuda"):
            return nullcontext, off
        if torch.cuda.is_bf16_supported():
            return (lambda: torch.autocast("cuda", dtype=torch.bfloat16)), off
        if private:
            if not self._warned_amp:
                log.warning("amp is off under DP-SGD: this GPU has no bfloat16, and float16's "
                            "loss scaling would skip steps on overflow and scale the "
                            "per-patient gradients Opacus clips")
                self._warned_amp = True
            return nullcontext, off
        return (lambda: torch.autocast("cuda", dtype=torch.float16)), torch.amp.GradScaler("cuda")

    def _train_ditto(self, received: dict[str, torch.Tensor], plan: TrainPlan, seed: int) -> int:
        """Train the personal model as many steps as the global one; return the steps."""
        net = self.personal_models.get(self.net)
        if net is None:  # Ditto starts the personal model from the global one
            net = copy.deepcopy(self.net)
            net.load_state_dict(received, strict=False)
        steps = self.steps_for(plan)
        loader = DataLoader(self._patches(seed), batch_size=plan.batch_size, shuffle=True,
                            generator=torch.Generator().manual_seed(seed))
        fit(net, _batches(loader, steps), _optimiser(net.parameters(), plan), _mean_loss,
            self.device, partial(_rate, plan, steps=steps), received, plan.ditto_lambda)
        self.personal_models.keep(net, plan.server_round)
        return steps

    def _finetune(self, weights: NDArrays, plan: TrainPlan) -> torch.nn.Module:
        """Fine-tune a copy of the loaded global model and keep it as the personal one."""
        net, _ = trainable_copy(self.net, plan.finetune_scope)
        seed = _mix_seed(plan.seed, self.site.seed, plan.server_round, _FINETUNE_SEED)
        torch.manual_seed(seed)
        loader = DataLoader(self._patches(seed), batch_size=plan.batch_size, shuffle=True,
                            generator=torch.Generator().manual_seed(seed))
        steps = plan.finetune_length(self.steps_for(plan))
        fit(net, _batches(loader, steps),
            _optimiser([p for p in net.parameters() if p.requires_grad], plan), _mean_loss,
            self.device, partial(finetune_rate, plan, steps=steps))
        self.personal_models.keep(net, plan.server_round, weights_digest(weights))
        return net

    def deployed(self, weights: NDArrays, plan: TrainPlan | None = None) -> torch.nn.Module:
        """Return the network this site evaluates and predicts with, given the global weights.

        Without personalisation: the global model with the site's own layers. Ditto:
        the personal model (the global one before the site's first round). Fine-tuning:
        with ``plan``, a new fine-tune of ``weights`` in the rounds ``finetune-rounds``
        names and the global model in the others; without, the one kept for them.

        Raises
        ------
        DataError
            Fine-tuning without ``plan`` and no fine-tune of ``weights`` is kept.
        """
        self.load_weights(weights)
        if self.personal.finetunes:
            if plan is not None:
                if finetunes_now(self.spec.personalization, plan.finetune_rounds,
                                 plan.last_round):
                    return self._finetune(weights, plan)
                return self.net
            tuned = self.personal_models.get(self.net, weights_digest(weights))
            if tuned is None:
                raise DataError(self.personal_models.path, "holds no fine-tune of these "
                                "global weights", "evaluate them at this site first")
            return tuned
        personal = self.personal_models.get(self.net) if self.personal.trains_personal else None
        return self.net if personal is None else personal

    def evaluate(self, weights: NDArrays, plan: TrainPlan | None = None) -> EvalResult:
        """Return the Dice of the deployed model on each held-out case, at full resolution.

        ``plan`` gives the fine-tuning settings (personalization ``finetune``) and
        the round: before the last one, prediction takes a single pass.
        """
        net = self.deployed(weights, plan)
        tiling = Tiling.of(self.spec)
        if plan is not None and not plan.last_round:
            # Rounds before the last monitor progress; only the last measures the
            # deployed prediction with its test-time flips (4-8 times the passes).
            tiling = tiling.single_pass()
        per_case: dict[str, float] = {}
        classes: list[np.ndarray] = []
        for case in self.data.val:
            pred = predict_classes(net, case.image, tiling, self.device)
            classes.append(dice_per_class(pred, case.label, self.spec.num_classes))
            per_case[case.case_id] = float(classes[-1].mean())
        dice = float(np.mean(list(per_case.values()))) if per_case else float("nan")
        per_class = tuple(float(v) for v in np.mean(classes, axis=0)) if classes else ()
        return EvalResult(dice=dice, per_case=per_case, num_examples=len(per_case),
                          per_class=per_class)

    def predict(self, weights: NDArrays, image: np.ndarray) -> np.ndarray:
        """Return the deployed model's class map of one channel-first, normalised image."""
        return predict_classes(self.deployed(weights), image, Tiling.of(self.spec), self.device)


def _optimiser(params: Iterable[torch.nn.Parameter], plan: TrainPlan) -> torch.optim.Optimizer:
    """Return the local optimiser: AdamW with ``plan.weight_decay`` > 0, else plain Adam."""
    if plan.weight_decay > 0:
        return torch.optim.AdamW(params, lr=plan.learning_rate, weight_decay=plan.weight_decay)
    return torch.optim.Adam(params, lr=plan.learning_rate)


def _private_optimiser(params: Iterable[torch.nn.Parameter],
                       plan: TrainPlan) -> torch.optim.Optimizer:
    """Return the optimiser DP-SGD's noisy gradients drive: SGD with momentum."""
    return torch.optim.SGD(params, lr=plan.dp_learning_rate, momentum=DP_MOMENTUM,
                           weight_decay=plan.weight_decay)


class PlainGradient:
    """Plain training's gradient of a batch: the mean patch loss, backpropagated."""

    rate_key = "learning-rate"  # the run-config key of its optimiser's learning rate

    def __init__(self, net: torch.nn.Module, optimiser: torch.optim.Optimizer,
                 autocast: Precision, scaler: torch.amp.GradScaler) -> None:
        self.net = net
        self.optimiser = optimiser
        self.autocast = autocast
        self.scaler = scaler

    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Backpropagate the batch's mean loss into ``p.grad``; return that loss."""
        self.optimiser.zero_grad(set_to_none=True)
        with self.autocast():
            logits = self.net(images.flatten(0, 1))
        loss = patch_losses(logits.float(), labels.flatten(0, 1)).mean()
        self.scaler.scale(loss).backward()
        self.scaler.unscale_(self.optimiser)  # true gradients, so FedProx's term adds to them
        return loss.detach()


class PrivateGradient:
    """DP-SGD's gradient of a batch: per-unit gradients, clipped, summed and noised."""

    rate_key = "dp-learning-rate"

    def __init__(self, per_unit: UnitGradients, private: PrivateStep) -> None:
        self.per_unit = per_unit
        self.private = private

    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor | None:
        """Leave the private gradient in ``p.grad``; return the mean unit loss, if any."""
        self.private.optimiser.zero_grad(set_to_none=True)
        losses = self.per_unit(images, labels)
        # Clip each unit's gradient, sum, add noise, divide by the expected number of
        # units and count the step; the wrapped optimiser's own step comes after.
        self.private.optimiser.pre_step()
        return losses.mean() if losses.numel() else None


def _collate_units(items: list[Batch], shape: tuple[tuple[int, ...], tuple[int, ...]]) -> Batch:
    """Stack units into a batch; an empty Poisson batch keeps the unit's shape."""
    if not items:
        return torch.zeros((0, *shape[0])), torch.zeros((0, *shape[1]), dtype=torch.int64)
    return (torch.stack([image for image, _ in items]),
            torch.stack([label for _, label in items]))


def _mean_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Return the batch's mean Dice + cross-entropy (the personal model's loss)."""
    return patch_losses(logits, labels).mean()


def _mean(values: Sequence[float]) -> float:
    return float(np.mean(values)) if values else float("nan")


def _set_learning_rate(optimiser: torch.optim.Optimizer, plan: TrainPlan, step: int,
                       steps: int) -> None:
    # The schedule scales the peak rate the optimiser was built with (Adam's or DP-SGD's).
    rate = learning_rate(plan.lr_schedule, optimiser.defaults["lr"], plan.server_round, step,
                         steps, plan.num_rounds)
    for group in optimiser.param_groups:
        group["lr"] = rate


def _rate(plan: TrainPlan, step: int, steps: int) -> float:
    """Return the scheduled learning rate of ``step`` (the personal model follows it too)."""
    return learning_rate(plan.lr_schedule, plan.learning_rate, plan.server_round, step, steps,
                         plan.num_rounds)


def finetune_rate(plan: TrainPlan, step: int, steps: int) -> float:
    """Return the learning rate of fine-tuning ``step`` (from 0) of ``steps``.

    The fine-tune anneals as the run did: ``lr-schedule`` over its own steps, from
    ``learning-rate x finetune-lr-factor``. A constant rate left the deployed model
    where the last noisy steps put it (retina, 750 steps from the 25-round global
    model, one seed: 0.777 constant at 0.1, 0.782 cosine from 0.5).
    """
    return learning_rate(plan.lr_schedule, plan.learning_rate * plan.finetune_lr_factor, 1,
                         step, steps, 1)


def _batches(loader: Iterable[Batch], steps: int) -> Iterator[Batch]:
    """Yield exactly ``steps`` batches, passing over ``loader`` as often as needed."""
    taken = 0
    while taken < steps:
        for batch in loader:
            if taken == steps:
                return
            taken += 1
            yield batch


_FINETUNE_SEED = 7919  # mixed into the fine-tune's seed, so its patches differ from training


def _mix_seed(*parts: int) -> int:
    return int(np.random.SeedSequence([abs(p) for p in parts]).generate_state(1)[0])
