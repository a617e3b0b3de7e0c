"""The round config: what the server tells every site, declared once per key.

:class:`ModelSpec` and :class:`TrainPlan` (with
:class:`shared.privacy.PrivacyRequest`) are the part of the coordinator's run
config a site needs for one round. Their fields are declared with
:mod:`shared.settings`: each carries its run-config key, its round-config
(``wire``) name, default, bounds and doc. The server writes them into every
message's ``ConfigRecord`` (:meth:`ModelSpec.to_config`,
:meth:`TrainPlan.to_config`); the site parses them from there, so a site never
depends on the coordinator's files, and a bad value is blamed on the round
config from the server, never on the site's own settings.

The owners' full tables are :class:`server.config.RunConfig` (coordinator) and
:class:`client.config.SiteConfig` (site).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from shared.networks import NETWORKS, NORMS
from shared.normalization import NORMALIZATIONS
from shared.partition import ADAPTATIONS
from shared.personalization import FINETUNE_ROUNDS, FINETUNE_SCOPES, PERSONALIZATIONS
from shared.planning import working_size
from shared.schedule import SCHEDULES
from shared.settings import (
    ROUND_CONFIG,
    RUN_CONFIG,
    Source,
    check,
    choice,
    flag,
    integer,
    integers,
    invalid,
    number,
    parse,
    to_wire,
)
from shared.trainable import TRAINABLE
from shared.weights import TRANSFER_DTYPES


def _csv(values: tuple[int, ...]) -> str:
    return ",".join(str(v) for v in values)


@dataclass(frozen=True)
class ModelSpec:
    """Architecture of the shared network; identical at every site and the server.

    BatchNorm is never used: Opacus rejects it, and its running statistics would
    leak site data into the shared weights. Each field's declaration says what it
    means (see the README's table of run-config keys).
    """

    SOURCE: ClassVar[Source] = RUN_CONFIG

    network: str = choice("network", "unet", "MONAI architecture", choices=NETWORKS,
                          wire="model-network", wire_required=True)
    norm: str = choice("norm", "instance", "normalisation (never BatchNorm)", choices=NORMS,
                       wire="model-norm", wire_required=True)
    channels: tuple[int, ...] = integers(
        "channels", (16, 32, 64, 128), "feature channels per level (basicunet: six values; "
        "segresnet: the first is its initial width)", wire="model-channels", wire_required=True,
        planned=True)
    in_channels: int = integer("in-channels", 1, "image channels (1 grey, 3 RGB)", minimum=1,
                               wire="model-in-channels", wire_required=True, planned=True)
    num_classes: int = integer("num-classes", 2, "classes including background (2 merges "
                               "every label value above 0 into one foreground)", minimum=2,
                               wire="model-num-classes", wire_required=True, planned=True)
    patch_size: tuple[int, ...] = integers(
        "patch-size", (64, 64), "training patch and sliding-window size; 3 values for 3D",
        wire="model-patch-size", wire_required=True, planned=True)
    resize: tuple[int, ...] = integers(
        "resize", (), "size every case is resampled to before training and inference (`none`: "
        "native resolution); Dice and masks stay at full resolution", wire="model-resize",
        planned=True, empty_ok=True)
    downsample: tuple[int, ...] = integers(
        "downsample", (), "whole factor per axis by which every case is shrunk before training "
        "and inference, keeping each case's proportions (e.g. `2,2,1`; `none`: native "
        "resolution); Dice and masks stay at full resolution", wire="model-downsample",
        planned=True, empty_ok=True)
    normalization: str = choice("normalization", "zscore", "intensity normalisation per image",
                                choices=NORMALIZATIONS, wire="model-normalization", planned=True)
    adaptation: str = choice("adaptation", "none", "site-local layers (see Domain adaptation)",
                             choices=ADAPTATIONS, wire="model-adaptation")
    # Not architecture, but what each site deploys: the checkpoint must say it, so that
    # predict and export apply the site's personal model (see Personalisation).
    personalization: str = choice("personalization", "none", "the model each site evaluates "
                                  "and deploys (see Personalisation)", choices=PERSONALIZATIONS,
                                  wire="model-personalization", planned=True)
    test_time_flips: bool = flag("test-time-flips", True, "the last round's evaluation and "
                                 "`fedseg predict` average the probabilities of every flipped "
                                 "copy of an image (4 passes in 2D, 8 in 3D), as nnU-Net does, "
                                 "when training flipped patches (not for whole resized images)",
                                 wire="model-test-time-flips")

    def __post_init__(self) -> None:
        check(self)
        if len(self.patch_size) not in (2, 3):
            raise invalid(self, "patch_size",
                          f"needs 2 (2D) or 3 (3D) values, got {_csv(self.patch_size)}")
        if self.resize and len(self.resize) != len(self.patch_size):
            raise invalid(self, "resize", f"needs {len(self.patch_size)} values like patch-size, "
                          f"or none, got {_csv(self.resize)}")
        if self.downsample and len(self.downsample) != len(self.patch_size):
            raise invalid(self, "downsample", f"needs {len(self.patch_size)} values like "
                          f"patch-size, or none, got {_csv(self.downsample)}")
        if self.downsample and self.resize:
            raise invalid(self, "downsample", "and resize both resample every case: set one "
                          "of them to none")
        network = NETWORKS[self.network]
        if len(self.channels) < network.min_levels:
            raise invalid(self, "channels", f"{self.network} {network.channels_hint}")
        factor = self.downsampling_factor
        if any(p % factor for p in self.patch_size):
            raise invalid(
                self, "patch_size",
                f"every value must be divisible by {factor} for {self.network} with "
                f"{len(self.channels)} levels, got {_csv(self.patch_size)}",
            )

    @property
    def norm_groups(self) -> int:
        """Groups of GroupNorm: the largest of 8, 4, 2, 1 dividing every normalised width.

        MONAI's UNet also normalises its last up-sampling output, whose width is
        ``num_classes``, so that width counts too.
        """
        widths = [*self.channels]
        if NETWORKS[self.network].normalises_output:
            widths.append(self.num_classes)
        return next(g for g in (8, 4, 2, 1) if all(w % g == 0 for w in widths))

    @property
    def spatial_dims(self) -> int:
        """Number of spatial dimensions (2 or 3)."""
        return len(self.patch_size)

    def working_size(self, shape: Sequence[int]) -> tuple[int, ...]:
        """Return the size a case of ``shape`` is trained and predicted at (``()``: its own)."""
        return working_size(shape, self.resize, self.downsample)

    @property
    def downsampling_factor(self) -> int:
        """Factor every input side must be divisible by."""
        return NETWORKS[self.network].downsampling(len(self.channels))

    def to_config(self) -> dict[str, Any]:
        """Flatten into ``model-*`` keys for a ``ConfigRecord`` or checkpoint."""
        return to_wire(self)

    @classmethod
    def from_config(cls, values: Mapping[str, Any], source: Source = ROUND_CONFIG) -> ModelSpec:
        """Parse the ``model-*`` keys written by :meth:`to_config`."""
        return parse(cls, values, source, by="wire")


@dataclass(frozen=True)
class TrainPlan:
    """What the coordinator asks of a site for one round of local training.

    Fields with a run-config key are set by the coordinator; ``server_round``,
    ``proximal_mu`` and ``uniform_weights`` are filled in per round by
    :meth:`server.config.RunConfig.plan`.
    """

    SOURCE: ClassVar[Source] = RUN_CONFIG

    server_round: int = integer(None, 1, "round number, from 1", minimum=0, wire="server-round")
    local_epochs: int = integer("local-epochs", 1, "passes over the site's training cases "
                                "(patients under DP-SGD) per round (when local-steps is 0)",
                                minimum=1, wire="local-epochs")
    local_steps: int = integer("local-steps", 0, "exact local optimiser steps per round; 0: use "
                               "local-epochs", minimum=0, wire="local-steps", planned=True)
    batch_size: int = integer("batch-size", 8, "cases per local step (one patch each); under "
                              "DP-SGD the expected number of patients",
                              minimum=1, wire="batch-size", planned=True)
    learning_rate: float = number("learning-rate", 3e-3, "peak learning rate of the local Adam "
                                  "optimiser", minimum=0.0, exclusive_minimum=True,
                                  wire="learning-rate", planned=True)
    lr_schedule: str = choice("lr-schedule", "constant", "learning-rate schedule over the whole "
                              "run's steps (not restarted each round)", choices=SCHEDULES,
                              wire="lr-schedule", planned=True)
    num_rounds: int = integer(None, 1, "rounds in the run, the schedule's length", minimum=1,
                              wire="num-rounds")
    weight_decay: float = number("weight-decay", 0.0, "Decoupled weight decay of the local "
                                 "optimiser (AdamW); 0 disables it", minimum=0.0,
                                 wire="weight-decay")
    ema_decay: float = number("ema-decay", 0.0, "weight of the running average of the trained "
                              "parameters over a round's local steps, which the site then "
                              "sends instead of the last step's (0 disables it)", minimum=0.0,
                              maximum=1.0, exclusive_maximum=True, wire="ema-decay")
    trainable: str = choice("dp-trainable", "all", "parameter groups every site trains and "
                            "sends, with or without DP; the others keep the global (starting) "
                            "values (see Differential privacy)", choices=TRAINABLE,
                            wire="dp-trainable")
    proximal_mu: float = number(None, 0.0, "FedProx coefficient for this round; 0 disables the "
                                "proximal term", minimum=0.0, wire="proximal-mu")
    seed: int = integer("seed", 0, "seed of the initial weights; sites mix in the round number "
                        "and their own seed", wire="seed")
    ditto_lambda: float = number("ditto-lambda", 0.1, "Ditto's pull of the personal model "
                                 "towards the global one (personalization ditto)", minimum=0.0,
                                 wire="ditto-lambda")
    finetune_steps: int = integer("finetune-steps", 0, "local fine-tuning steps (personalization "
                                  "finetune); 0: as many as one round's local steps",
                                  minimum=0, wire="finetune-steps", planned=True)
    finetune_rounds: str = choice("finetune-rounds", "final", "rounds whose evaluation fine-tunes "
                                  "first (personalization finetune)", choices=FINETUNE_ROUNDS,
                                  wire="finetune-rounds")
    finetune_lr_factor: float = number("finetune-lr-factor", 0.5, "peak fine-tuning learning "
                                       "rate as a fraction of learning-rate (annealed by "
                                       "lr-schedule over the fine-tune's steps)", minimum=0.0,
                                       maximum=1.0, exclusive_minimum=True,
                                       wire="finetune-lr-factor")
    finetune_scope: str = choice("finetune-scope", "all", "parameters a fine-tune may change",
                                 choices=FINETUNE_SCOPES, wire="finetune-scope")
    dp_augmentations: int = integer(
        "dp-augmentations", 1, "augmented patches per sampled patient under DP-SGD, averaged "
        "before clipping (no extra privacy cost)", minimum=1, wire="dp-augmentations")
    dp_learning_rate: float = number(
        "dp-learning-rate", 0.05, "peak learning rate of the local optimiser under DP-SGD (SGD "
        "with momentum 0.9; learning-rate is plain training's Adam)", minimum=0.0,
        exclusive_minimum=True, wire="dp-learning-rate")
    uniform_weights: bool = flag(None, False, "weight every site's update equally (central DP)",
                                 wire="uniform-weights")
    transfer_dtype: str = choice("transfer-dtype", "float32", "precision of the shared weights "
                                 "in messages, both ways (`float16` halves them; training, "
                                 "aggregation and checkpoints stay float32)",
                                 choices=TRANSFER_DTYPES, wire="transfer-dtype")

    def __post_init__(self) -> None:
        check(self)

    def finetune_length(self, round_steps: int) -> int:
        """Return the fine-tune's optimiser steps, given a round's ``round_steps`` at the site.

        ``finetune-steps`` 0 means one round's worth.
        """
        return self.finetune_steps or round_steps

    @property
    def last_round(self) -> bool:
        """Whether this is the run's last round, whose evaluation is what a site deploys."""
        return self.server_round >= self.num_rounds

    def to_config(self) -> dict[str, Any]:
        """Flatten into keys for a ``ConfigRecord``."""
        return to_wire(self)

    @classmethod
    def from_config(cls, values: Mapping[str, Any], source: Source = ROUND_CONFIG) -> TrainPlan:
        """Parse the keys written by :meth:`to_config`; absent keys take their defaults."""
        return parse(cls, values, source, by="wire")
