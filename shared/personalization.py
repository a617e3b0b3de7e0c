"""Personalisation: the model each site deploys, beside the global one.

Every mode is one entry of :data:`PERSONALIZATIONS` (run-config key
``personalization``). A mode decides what a site evaluates, predicts and exports
with; it never changes what is sent: the shared weights of the global model are
the only weights that leave the site in every mode. The modes combine with any
``adaptation`` (which layers of the *global* model stay at the site, the local
head included): a personal model is the whole network, site-local layers and all.

:data:`FINETUNE_SCOPES` says which parameters a local fine-tune may change.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from shared.partition import LOCAL_NORM_TYPES, module_parameter_names, segmentation_head
from shared.registry import Registry


@dataclass(frozen=True)
class PersonalizationMode:
    """One kind of personal model.

    Attributes
    ----------
    doc : str
        What the site deploys, for the README.
    personal_model : bool
        The site keeps a whole personal network in its state folder and deploys it.
    trains_personal : bool
        Each round the personal network also trains, regularised towards the
        received global model (Ditto).
    finetunes : bool
        Before evaluating, the site fine-tunes the received global model locally.
    """

    doc: str
    personal_model: bool = False
    trains_personal: bool = False
    finetunes: bool = False


PERSONALIZATIONS: Registry[PersonalizationMode] = Registry("personalization", {
    "none": PersonalizationMode("the global model (with the site's adaptation layers)"),
    "ditto": PersonalizationMode(
        "Ditto: a personal network trained each round for as many local steps as the global "
        "one, on loss + (ditto-lambda/2)·||w − w_global||²", personal_model=True,
        trains_personal=True),
    "finetune": PersonalizationMode(
        "the global model fine-tuned locally for finetune-steps steps before the evaluation "
        "(finetune-rounds: of the last round or of every round; finetune-scope: which "
        "parameters)", personal_model=True, finetunes=True),
})


@dataclass(frozen=True)
class FinetuneRounds:
    """The rounds before whose evaluation a site fine-tunes the global model."""

    doc: str
    every_round: bool


#: Fine-tuning only the final global model costs its steps once per run instead of
#: once per round, so the deployed model can take a whole round's steps of it (on
#: retina, 8 rounds: 20 steps before every evaluation 0.730, 100 steps 0.742, none 0.713).
FINETUNE_ROUNDS: Registry[FinetuneRounds] = Registry("finetune-rounds", {
    "final": FinetuneRounds("the last round only; earlier rounds evaluate the global model",
                            every_round=False),
    "all": FinetuneRounds("every round (a personal Dice per round, at finetune-steps extra "
                          "steps each)", every_round=True),
})


def finetunes_now(mode: str, rounds: str, last_round: bool) -> bool:
    """Return whether a site fine-tunes before this round's evaluation.

    Parameters
    ----------
    mode : str
        The run's ``personalization``.
    rounds : str
        Its ``finetune-rounds``.
    last_round : bool
        This is the run's last round.
    """
    if not PERSONALIZATIONS[mode].finetunes:
        return False
    return FINETUNE_ROUNDS[rounds].every_round or last_round


@dataclass(frozen=True)
class FinetuneScope:
    """Which parameters a fine-tune may change (all others stay as received)."""

    doc: str
    pick: Callable[[nn.Module], frozenset[str]]


def _all(net: nn.Module) -> frozenset[str]:
    return frozenset(name for name, _ in net.named_parameters())


def _head(net: nn.Module) -> frozenset[str]:
    return module_parameter_names(net, (), segmentation_head)


def _norm(net: nn.Module) -> frozenset[str]:
    return module_parameter_names(net, (lambda m: isinstance(m, LOCAL_NORM_TYPES),))


FINETUNE_SCOPES: Registry[FinetuneScope] = Registry("finetune-scope", {
    "all": FinetuneScope("every parameter", _all),
    "head": FinetuneScope("the segmentation head only (as adaptation local-head)", _head),
    "norm": FinetuneScope("the affine parameters of the normalisation layers only", _norm),
})


def finetune_parameter_names(net: nn.Module, scope: str) -> frozenset[str]:
    """Return the names (as in ``net.named_parameters()``) a fine-tune of ``scope`` may change."""
    return FINETUNE_SCOPES[scope].pick(net)
