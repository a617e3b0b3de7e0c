"""Personal models (Ditto, local fine-tuning): their update, their file, their rules.

A personal model is a whole network that a site keeps in its state folder and
deploys instead of the global model (:data:`shared.personalization.PERSONALIZATIONS`).
It is never sent anywhere: what leaves the site is the global model's update, as
without personalisation. The functions here are plain PyTorch; the trainer calls
them with its own loss, device, optimiser and batches.
"""

from __future__ import annotations

import copy
import hashlib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from client.proximal import proximal_term
from client.site_state import read_state_file
from shared.atomic import write_atomic
from shared.config import ModelSpec
from shared.errors import ConfigError, DataError
from shared.personalization import PERSONALIZATIONS, finetune_parameter_names
from shared.privacy import PrivacySettings
from shared.weights import NDArrays, numpy_to_state, state_to_numpy

FORMAT = "fedseg-personal-model/1"
FILE_NAME = "personal-model.pt"
# Like the local layers, a lost personal model costs accuracy, never privacy.
_FIX = "move it aside to start the site's personal model afresh"

Batch = tuple[torch.Tensor, torch.Tensor]
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def ditto_objective(loss: torch.Tensor, params: Iterable[tuple[str, torch.Tensor]],
                    anchor: Mapping[str, torch.Tensor], lam: float) -> torch.Tensor:
    """Return Ditto's personal objective ``loss + (lam / 2) * ||v - w||^2``.

    Parameters
    ----------
    loss : torch.Tensor
        The site's loss of the personal model ``v`` on a batch.
    params : iterable of (name, tensor)
        The personal model's named parameters.
    anchor : Mapping[str, torch.Tensor]
        The global model ``w`` received this round (with the site's own layers).
    lam : float
        Ditto's lambda; 0 trains the personal model on the local loss alone.

    Returns
    -------
    torch.Tensor
        A scalar whose gradient in ``v`` is ``grad loss + lam * (v - w)``.
    """
    if lam == 0:
        return loss
    return loss + lam / 2 * proximal_term(params, anchor)


def personal_step(net: nn.Module, batch: Batch, loss_fn: LossFn,
                  optimiser: torch.optim.Optimizer, anchor: Mapping[str, torch.Tensor] | None,
                  lam: float, device: torch.device) -> float:
    """Take one optimiser step of ``net`` on ``batch`` and return the loss before it.

    With an ``anchor`` the step is Ditto's (:func:`ditto_objective`); without one it
    is a plain step on the loss (local fine-tuning). Parameters that do not require
    gradients are not changed.

    Raises
    ------
    FloatingPointError
        The objective is not finite.
    """
    images, labels = batch
    optimiser.zero_grad(set_to_none=True)
    loss = loss_fn(net(images.to(device)), labels.to(device))
    if anchor is not None:
        loss = ditto_objective(loss, net.named_parameters(), anchor, lam)
    if not torch.isfinite(loss):
        raise FloatingPointError(f"the personal model's loss became {loss.item()}")
    loss.backward()
    optimiser.step()
    return float(loss.detach())


def anchor_of(net: nn.Module) -> dict[str, torch.Tensor]:
    """Return detached copies of ``net``'s parameters: the global model Ditto is pulled to."""
    return {name: p.detach().clone() for name, p in net.named_parameters()}


def trainable_copy(net: nn.Module, scope: str) -> tuple[nn.Module, frozenset[str]]:
    """Return a copy of ``net`` in which only the parameters of ``scope`` require gradients.

    The copy is what a fine-tune changes; ``net`` itself, and with it the global
    weights a site sends, is left as it was.
    """
    tuned = copy.deepcopy(net)
    allowed = finetune_parameter_names(tuned, scope)
    for name, p in tuned.named_parameters():
        p.requires_grad_(name in allowed)
    return tuned, allowed


def weights_digest(weights: Mapping[str, np.ndarray]) -> str:
    """Return a SHA-256 over names, dtypes, shapes and values: which model was fine-tuned."""
    digest = hashlib.sha256()
    for name in sorted(weights):
        array = np.ascontiguousarray(weights[name])
        digest.update(f"{name}|{array.dtype.str}|{array.shape}|".encode())
        digest.update(array.tobytes())
    return digest.hexdigest()


def refuse_under_dp(spec: ModelSpec, privacy: PrivacySettings | None) -> None:
    """Refuse a personal model at a site that trains with DP-SGD.

    The personal model (or fine-tune) would learn from the training cases without
    clipping and noise, and its validation Dice is sent, so the site's epsilon
    would no longer cover everything it releases.

    Raises
    ------
    ConfigError
        ``privacy`` is set and ``spec.personalization`` keeps a personal model.
    """
    if privacy is not None and PERSONALIZATIONS[spec.personalization].personal_model:
        raise ConfigError(
            "round config from the server", "personalization",
            f"'{spec.personalization}' would train a personal model outside DP-SGD's privacy "
            "accounting at a site that trains with DP",
            "run with personalization='none' (adaptation layers do train under DP)")


@dataclass(frozen=True)
class PersonalModel:
    """A personal network as saved in a site's state folder.

    Attributes
    ----------
    weights : dict of numpy.ndarray
        Every floating-point entry of the network's state dict.
    server_round : int
        The round it was last trained or fine-tuned in.
    base : str
        Fine-tuning: :func:`weights_digest` of the global weights it was tuned
        from; empty for Ditto, whose personal model lives across rounds.
    """

    weights: NDArrays
    server_round: int
    base: str = ""


def save_personal_model(state_dir: Path, spec: ModelSpec, model: PersonalModel) -> None:
    """Write the personal model atomically, with the model settings it belongs to."""
    payload: dict[str, Any] = {
        "format": FORMAT, "personalization": spec.personalization, "model": spec.to_config(),
        "round": model.server_round, "base": model.base,
        "weights": numpy_to_state(model.weights),
    }
    write_atomic(state_dir / FILE_NAME, lambda tmp: torch.save(payload, tmp))


def read_personal_model(state_dir: Path) -> tuple[str, dict[str, Any], PersonalModel] | None:
    """Return the mode, model settings and personal model saved in ``state_dir``, if any.

    Checks only that the file is one :func:`save_personal_model` wrote; whether it
    fits a run is up to :func:`load_personal_model`.

    Raises
    ------
    DataError
        "damaged personal model": not a readable file, or not a fedseg personal model.
    """
    path = state_dir / FILE_NAME
    payload = read_state_file(path, FORMAT, "personal model", "personal-model", _FIX)
    if payload is None:
        return None
    mode, weights, model, rnd, base = (
        payload.get(k) for k in ("personalization", "weights", "model", "round", "base"))
    if (not isinstance(mode, str) or not isinstance(weights, dict)
            or not isinstance(model, dict) or not isinstance(rnd, int)
            or not isinstance(base, str)
            or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                       for k, v in weights.items())):
        raise DataError(path, "damaged personal model: no weights, round or model settings",
                        _FIX)
    return mode, model, PersonalModel(state_to_numpy(weights), rnd, base)


def load_personal_model(state_dir: Path, spec: ModelSpec,
                        expected: Mapping[str, tuple[int, ...]]) -> PersonalModel | None:
    """Return the personal model saved for ``spec`` in ``state_dir``, or ``None`` if none.

    Parameters
    ----------
    state_dir : pathlib.Path
        The site's state folder.
    spec : ModelSpec
        The model it must have been saved for (architecture, adaptation and
        personalisation all equal).
    expected : mapping of str to tuple of int
        The network's floating-point state names and shapes.

    Raises
    ------
    DataError
        The file is damaged (see :func:`read_personal_model`), or belongs to
        another model.
    """
    saved = read_personal_model(state_dir)
    if saved is None:
        return None
    path = state_dir / FILE_NAME
    mode, model, personal = saved
    try:
        # Parsed, so a file from before a model key was added (its default) still fits.
        same = ModelSpec.from_config(model) == spec
    except ConfigError:
        same = False
    if not same:
        raise DataError(path, f"holds a personal model ({mode}) of other model settings than "
                        "this run's", _FIX)
    if {k: tuple(v.shape) for k, v in personal.weights.items()} != dict(expected):
        raise DataError(path, "does not match this run's model", _FIX)
    return personal


class PersonalStore:
    """A site's personal network: read from its state folder once, written after every change.

    Parameters
    ----------
    state_dir : pathlib.Path
        The site's state folder.
    spec : ModelSpec
        The run's model; a saved personal model of other settings is refused.
    """

    def __init__(self, state_dir: Path, spec: ModelSpec) -> None:
        self.state_dir = state_dir
        self.spec = spec
        self._kept: tuple[nn.Module, PersonalModel] | None = None

    @property
    def path(self) -> Path:
        """The personal model's file."""
        return self.state_dir / FILE_NAME

    def get(self, like: nn.Module, base: str | None = None) -> nn.Module | None:
        """Return the personal network, or ``None`` if there is none (of ``base``).

        Parameters
        ----------
        like : torch.nn.Module
            A network of the run's model; a saved personal model is loaded into a copy.
        base : str, optional
            Only a fine-tune of the global weights with this :func:`weights_digest`.
        """
        if self._kept is None:
            state = state_to_numpy(like.state_dict())
            saved = load_personal_model(self.state_dir, self.spec,
                                        {k: tuple(v.shape) for k, v in state.items()})
            if saved is not None:
                net = copy.deepcopy(like)
                net.load_state_dict(numpy_to_state(saved.weights), strict=False)
                self._kept = (net.eval(), saved)
        if self._kept is None or (base is not None and self._kept[1].base != base):
            return None
        return self._kept[0]

    def keep(self, net: nn.Module, server_round: int, base: str = "") -> None:
        """Make ``net`` the personal network and save it atomically."""
        model = PersonalModel(state_to_numpy(net.state_dict()), server_round, base)
        save_personal_model(self.state_dir, self.spec, model)
        self._kept = (net.eval(), model)


def fit(net: nn.Module, batches: Iterable[Batch], optimiser: torch.optim.Optimizer,
        loss_fn: LossFn, device: torch.device, rate: Callable[[int], float],
        anchor: Mapping[str, torch.Tensor] | None = None, lam: float = 0.0) -> list[float]:
    """Train ``net`` on ``batches`` with :func:`personal_step`; return each step's loss.

    ``rate(step)`` is the learning rate of each step (from 0).
    """
    net.train()
    losses = []
    for step, batch in enumerate(batches):
        for group in optimiser.param_groups:
            group["lr"] = rate(step)
        losses.append(personal_step(net, batch, loss_fn, optimiser, anchor, lam, device))
    net.eval()
    return losses
