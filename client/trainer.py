"""The site trainer: local training, evaluation and prediction on plain weights.

Nothing here knows about Flower. The ClientApp, the simulation, the command line
and the tests all call :class:`SiteTrainer` with NumPy weight dictionaries, so the
learning code is tested once and behaves the same everywhere.
"""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Iterable, Iterator
from contextlib import nullcontext
from dataclasses import dataclass
from functools import partial

import numpy as np
import torch
from monai.losses import DiceCELoss
from torch.utils.data import DataLoader

from client.accounting import calibrate_noise, sample_rate
from client.augment import PatchDataset
from client.config import SiteConfig
from client.data_contract import LoadedCase, site_split
from client.inference import Tiling, predict_classes, resolve_device
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
from client.proximal import proximal_term
from client.site_state import load_local_layers, save_local_layers
from shared.config import ModelSpec, TrainPlan
from shared.errors import DataError
from shared.metrics import case_dice
from shared.networks import build_network
from shared.partition import local_parameter_names, split_weights
from shared.personalization import PERSONALIZATIONS
from shared.privacy import PrivacySettings
from shared.schedule import learning_rate
from shared.trainable import trainable_names
from shared.weights import NDArrays, check_compatible, numpy_to_state, state_to_numpy

Batch = tuple[torch.Tensor, torch.Tensor]


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
        # Training cases are resampled once to the planned size; validation cases keep
        # their own, so Dice is measured against the label as the hospital drew it.
        return cls(
            train=tuple(prepared_case(r, spec, spec.resize, site.cache_dir) for r in train_refs),
            val=tuple(prepared_case(r, spec, (), site.cache_dir) for r in val_refs),
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


@dataclass(frozen=True)
class EvalResult:
    """Validation of one set of weights on the site's held-out cases."""

    dice: float
    per_case: dict[str, float]
    num_examples: int


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
        self.loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
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
                self.spec.patch_size, seed, whole_image=self.spec.resize == self.spec.patch_size)
        else:
            self._dataset.reseed(seed)
        return self._dataset

    def steps_for(self, plan: TrainPlan) -> int:
        """Return the number of optimiser steps ``plan`` asks for at this site."""
        if plan.local_steps:
            return plan.local_steps
        return plan.local_epochs * math.ceil(self.num_train_cases / plan.batch_size)

    def train(self, global_weights: NDArrays, plan: TrainPlan,
              privacy: PrivacySettings | None = None) -> TrainResult:
        """Run one round of local training from ``global_weights``.

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
        dataset = self._patches(seed)
        loader = DataLoader(dataset, batch_size=plan.batch_size, shuffle=True,
                            generator=torch.Generator().manual_seed(seed))
        if privacy is not None:
            return self._train_private(loader, plan, privacy)
        anchor = {n: p.detach().clone() for n, p in self.net.named_parameters()}
        optimiser = _optimiser(_trained(self.net), plan)
        use_amp = self.site.amp and self.device.type == "cuda"
        scaler = torch.amp.GradScaler("cuda", enabled=use_amp)
        self.net.train()
        losses: list[float] = []
        steps = self.steps_for(plan)
        for step, (images, labels) in enumerate(_batches(loader, steps)):
            _set_learning_rate(optimiser, plan, step, steps)
            images = images.to(self.device)
            labels = labels.to(self.device)
            optimiser.zero_grad(set_to_none=True)
            autocast = (torch.autocast("cuda", dtype=torch.float16) if use_amp
                        else nullcontext())
            with autocast:
                loss = self.loss_fn(self.net(images), labels)
            if plan.proximal_mu > 0:
                loss = loss + plan.proximal_mu / 2 * proximal_term(
                    self.net.named_parameters(), anchor)
            if not torch.isfinite(loss):
                raise FloatingPointError(
                    f"site {self.site.site_name}: training loss became {loss.item()} in "
                    f"round {plan.server_round}; lower learning-rate in the run config"
                )
            scaler.scale(loss).backward()
            scaler.step(optimiser)
            scaler.update()
            losses.append(float(loss.detach()))
        self._save_local()
        personal_steps = 0 if received is None else self._train_ditto(received, loader, plan)
        return TrainResult(
            weights=self.sent_weights(),
            num_examples=self.num_train_cases,
            train_loss=float(np.mean(losses)),
            # Ditto's personal steps count too: the site's compute, honestly reported.
            steps=len(losses) + personal_steps,
        )

    def _train_private(self, loader: DataLoader[tuple[torch.Tensor, torch.Tensor]],
                       plan: TrainPlan, privacy: PrivacySettings) -> TrainResult:
        """DP-SGD with Opacus: Poisson-sampled cases, per-case clipping, Gaussian noise."""
        # Locked from reading the spent epsilon until this round's steps are saved:
        # two rounds at once would otherwise both start from the old spending and the
        # later save would drop the other's steps.
        with PrivacyLedger.locked(self.site.state_dir) as ledger:
            return self._train_private_locked(ledger, loader, plan, privacy)

    def _train_private_locked(self, ledger: PrivacyLedger,
                              loader: DataLoader[tuple[torch.Tensor, torch.Tensor]],
                              plan: TrainPlan, privacy: PrivacySettings) -> TrainResult:
        """Run the DP round itself; the caller holds the ledger's lock."""
        from opacus import PrivacyEngine

        rate = sample_rate(plan.batch_size, self.num_train_cases)
        steps = self.steps_for(plan)
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
        # A private copy gets Opacus's hooks; the site's network stays unwrapped, so
        # parameter names are the same with and without DP.
        net = copy.deepcopy(self.net)
        net.train()
        optimiser = _optimiser(_trained(net), plan)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Opacus warns about secure RNG on every call
            engine = PrivacyEngine(accountant=privacy.accountant)
            dp_net, dp_optimiser, dp_loader = engine.make_private(
                module=net, optimizer=optimiser, data_loader=loader, noise_multiplier=noise,
                max_grad_norm=privacy.max_grad_norm, poisson_sampling=True)
        losses: list[float] = []
        taken = 0
        for images, labels in _batches(dp_loader, steps):
            _set_learning_rate(dp_optimiser, plan, taken, steps)
            taken += 1  # an empty Poisson batch is still a sampling step to account for
            if images.shape[0] == 0:
                continue
            dp_optimiser.zero_grad(set_to_none=True)
            loss = self.loss_fn(dp_net(images.to(self.device)), labels.to(self.device))
            loss.backward()
            dp_optimiser.step()
            losses.append(float(loss.detach()))
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
            train_loss=float(np.mean(losses)) if losses else float("nan"), steps=taken,
            epsilon=epsilon, delta=privacy.delta,
        )

    def _train_ditto(self, received: dict[str, torch.Tensor],
                     loader: DataLoader[tuple[torch.Tensor, torch.Tensor]],
                     plan: TrainPlan) -> int:
        """Train the personal model as many steps as the global one; return the steps."""
        net = self.personal_models.get(self.net)
        if net is None:  # Ditto starts the personal model from the global one
            net = copy.deepcopy(self.net)
            net.load_state_dict(received, strict=False)
        steps = self.steps_for(plan)
        fit(net, _batches(loader, steps), _optimiser(net.parameters(), plan), self.loss_fn,
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
        rate = plan.learning_rate * plan.finetune_lr_factor
        fit(net, _batches(loader, plan.finetune_steps),
            _optimiser([p for p in net.parameters() if p.requires_grad], plan), self.loss_fn,
            self.device, lambda step: rate)
        self.personal_models.keep(net, plan.server_round, weights_digest(weights))
        return net

    def deployed(self, weights: NDArrays, plan: TrainPlan | None = None) -> torch.nn.Module:
        """Return the network this site evaluates and predicts with, given the global weights.

        Without personalisation: the global model with the site's own layers. Ditto:
        the personal model (the global one before the site's first round). Fine-tuning:
        with ``plan``, a new fine-tune of ``weights``; without, the one kept for them.

        Raises
        ------
        DataError
            Fine-tuning without ``plan`` and no fine-tune of ``weights`` is kept.
        """
        self.load_weights(weights)
        if self.personal.finetunes:
            if plan is not None:
                return self._finetune(weights, plan)
            tuned = self.personal_models.get(self.net, weights_digest(weights))
            if tuned is None:
                raise DataError(self.personal_models.path, "holds no fine-tune of these "
                                "global weights", "evaluate them at this site first")
            return tuned
        personal = self.personal_models.get(self.net) if self.personal.trains_personal else None
        return self.net if personal is None else personal

    def evaluate(self, weights: NDArrays, plan: TrainPlan | None = None) -> EvalResult:
        """Return the Dice of the deployed model on each held-out case, at full resolution.

        ``plan`` gives the fine-tuning settings (personalization ``finetune``).
        """
        net = self.deployed(weights, plan)
        per_case: dict[str, float] = {}
        for case in self.data.val:
            pred = predict_classes(net, case.image, Tiling.of(self.spec), self.device)
            per_case[case.case_id] = case_dice(pred, case.label, self.spec.num_classes)
        dice = float(np.mean(list(per_case.values()))) if per_case else float("nan")
        return EvalResult(dice=dice, per_case=per_case, num_examples=len(per_case))

    def predict(self, weights: NDArrays, image: np.ndarray) -> np.ndarray:
        """Return the deployed model's class map of one channel-first, normalised image."""
        return predict_classes(self.deployed(weights), image, Tiling.of(self.spec), self.device)


def _trained(net: torch.nn.Module) -> list[torch.nn.Parameter]:
    # Frozen parameters stay out of the optimiser: AdamW's weight decay must not move them.
    return [p for p in net.parameters() if p.requires_grad]


def _optimiser(params: Iterable[torch.nn.Parameter], plan: TrainPlan) -> torch.optim.Optimizer:
    """Return the local optimiser: AdamW with ``plan.weight_decay`` > 0, else plain Adam."""
    if plan.weight_decay > 0:
        return torch.optim.AdamW(params, lr=plan.learning_rate, weight_decay=plan.weight_decay)
    return torch.optim.Adam(params, lr=plan.learning_rate)


def _set_learning_rate(optimiser: torch.optim.Optimizer, plan: TrainPlan, step: int,
                       steps: int) -> None:
    rate = learning_rate(plan.lr_schedule, plan.learning_rate, plan.server_round, step, steps,
                         plan.num_rounds)
    for group in optimiser.param_groups:
        group["lr"] = rate


def _rate(plan: TrainPlan, step: int, steps: int) -> float:
    """Return the scheduled learning rate of ``step`` (the personal model follows it too)."""
    return learning_rate(plan.lr_schedule, plan.learning_rate, plan.server_round, step, steps,
                         plan.num_rounds)


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
