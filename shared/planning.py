"""Federated self-configuration: site fingerprints in, one training plan out.

nnU-Net's lesson is that configuring the pipeline to the data (resolution, patch,
depth, normalisation, schedule) matters more than the architecture. Here the same
two stages run federated: each site summarises its data in a :class:`Fingerprint`
of aggregate numbers only (medians and fractions, coarsened, never a case's own
values, names or paths), and the server turns the fingerprints of all sites into
one :class:`Plan`. Everything in this module is pure arithmetic on those numbers,
so the planner's output is tested exactly on hand-made fingerprints.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from shared.errors import FedsegError


class PlanningError(FedsegError):
    """The sites' fingerprints cannot be combined into one plan."""


#: Keys of a fingerprint message, in order; all values are numbers.
FINGERPRINT_KEYS: tuple[str, ...] = (
    "fp-num-cases", "fp-spatial-dims", "fp-channels", "fp-has-spacing",
    "fp-shape-0", "fp-shape-1", "fp-shape-2",
    "fp-spacing-0", "fp-spacing-1", "fp-spacing-2",
    "fp-foreground-fraction", "fp-thickness", "fp-dark-fraction",
    "fp-fg-intensity-low", "fp-fg-intensity-median", "fp-fg-intensity-high",
    "fp-dp-patients", "fp-classes",
)
#: More distinct label values than this are grey levels of a mask, not class codes
#: (``fedseg site check`` calls 16 or more a soft mask).
MAX_CLASS_CODES = 15
# Intensities may be negative (CT in Hounsfield units, z-scored MRI); nothing else may.
_SIGNED = frozenset({"fp-fg-intensity-low", "fp-fg-intensity-median", "fp-fg-intensity-high"})


@dataclass(frozen=True)
class Fingerprint:
    """Aggregate description of one site's training data.

    Every value is a median over the site's cases, coarsened so that it is a
    property of the collection rather than of one case.

    Attributes
    ----------
    num_cases : int
        Training cases at the site.
    spatial_dims : int
        2 or 3.
    channels : int
        Image channels (1 grey, 3 RGB).
    shape : tuple of int
        Median image size per spatial axis, rounded to a multiple of 8.
    spacing : tuple of float
        Median voxel spacing per axis (1.0 where the format has none).
    has_spacing : bool
        Whether the files carry a physical spacing (NIfTI) or not (PNG, JPEG).
    foreground_fraction : float
        Median share of foreground voxels per case, two decimals.
    thickness : float
        Median structure thickness in voxels: four times the mean distance of a
        foreground voxel to the background (exact for a strip), one decimal.
    dark_fraction : float
        Median share of voxels near the image's minimum: large for fundus photographs,
        whose field of view sits in a black frame; two decimals.
    fg_intensity : tuple of float
        Medians over cases of the 0.5th, 50th and 99.5th percentile of the
        foreground intensity (channel mean), two significant decimals.
    dp_patients : int
        Patients in the training split when the site trains under DP-SGD, 0 when it
        does not: the privacy units its noise is calibrated over, which the plan
        needs to keep that noise small enough to learn.
    classes : int
        What the site's label values code: ``K`` for exactly the class codes
        ``0 .. K-1`` (2 for ``{0, 1}``), 1 for background only, 0 for one
        foreground by threshold (``{0, 255}``, a soft mask, codes with gaps),
        which cannot be read as the codes of several structures.
    """

    num_cases: int
    spatial_dims: int
    channels: int
    shape: tuple[int, ...]
    spacing: tuple[float, ...]
    has_spacing: bool
    foreground_fraction: float
    thickness: float
    dark_fraction: float
    fg_intensity: tuple[float, float, float] = (0.0, 0.0, 0.0)
    dp_patients: int = 0
    classes: int = 2

    def to_record(self) -> dict[str, int | float]:
        """Flatten into the numbers of a fingerprint message (unused axes are 0)."""
        shape = (*self.shape, *(0,) * (3 - len(self.shape)))
        spacing = (*self.spacing, *(0.0,) * (3 - len(self.spacing)))
        values: tuple[int | float, ...] = (
            self.num_cases, self.spatial_dims, self.channels, int(self.has_spacing),
            *shape, *spacing, self.foreground_fraction, self.thickness, self.dark_fraction,
            *self.fg_intensity, self.dp_patients, self.classes,
        )
        return dict(zip(FINGERPRINT_KEYS, values, strict=True))

    @classmethod
    def from_record(cls, values: Mapping[str, Any], source: str) -> Fingerprint:
        """Parse a fingerprint message; anything but the declared numbers is refused."""
        extra = sorted(set(values) - set(FINGERPRINT_KEYS))
        missing = [k for k in FINGERPRINT_KEYS if k not in values]
        if extra or missing:
            raise PlanningError(f"{source}: fingerprint has unexpected keys {extra} or misses "
                                f"{missing}; every site must run the same fedseg version")
        nums: dict[str, float] = {}
        for key in FINGERPRINT_KEYS:
            value = values[key]
            if isinstance(value, bool) or not isinstance(value, int | float) \
                    or not math.isfinite(value) or (value < 0 and key not in _SIGNED):
                raise PlanningError(f"{source}: fingerprint value '{key}' is {value!r}, "
                                    "expected a finite number >= 0; check the site's data")
            nums[key] = float(value)
        dims = int(nums["fp-spatial-dims"])
        if dims not in (2, 3):
            raise PlanningError(f"{source}: fingerprint says {dims}D images; only 2D and 3D "
                                "are supported")
        if nums["fp-classes"] > MAX_CLASS_CODES or nums["fp-classes"] != int(nums["fp-classes"]):
            raise PlanningError(f"{source}: fingerprint value 'fp-classes' is "
                                f"{values['fp-classes']!r}, expected a whole number from 0 to "
                                f"{MAX_CLASS_CODES}; every site must run the same fedseg version")
        return cls(
            num_cases=int(nums["fp-num-cases"]), spatial_dims=dims,
            channels=int(nums["fp-channels"]),
            shape=tuple(int(nums[f"fp-shape-{i}"]) for i in range(dims)),
            spacing=tuple(nums[f"fp-spacing-{i}"] for i in range(dims)),
            has_spacing=bool(nums["fp-has-spacing"]),
            foreground_fraction=nums["fp-foreground-fraction"],
            thickness=nums["fp-thickness"], dark_fraction=nums["fp-dark-fraction"],
            fg_intensity=(nums["fp-fg-intensity-low"], nums["fp-fg-intensity-median"],
                          nums["fp-fg-intensity-high"]),
            dp_patients=int(nums["fp-dp-patients"]), classes=int(nums["fp-classes"]),
        )


@dataclass(frozen=True)
class PrivateRules:
    """What the plan changes when any site trains under DP-SGD.

    The noise DP-SGD adds to a summed gradient grows with the square root of the
    number of trained parameters, while the signal grows with the patients sampled
    per step. So a private plan trains a smaller network on smaller images, samples
    a large share of the smallest private site's patients per step, and spends
    fewer, larger steps (measured on chest X-ray at epsilon 8: see the README's
    "Differential privacy").

    Attributes
    ----------
    whole_image_side : int
        Longest side a 2D image with thick structures is resized to.
    max_levels : int
        Resolution levels of the U-Net at most.
    base_channels, max_channels : dict of int to int
        Width of the first level, doubled per level up to the maximum.
    patient_share : float
        Share of the smallest private site's training patients one step samples
        (the batch size is that many patients, within the bounds below).
    min_batch, max_batch : dict of int to int
        Bounds of the batch size (expected patients per step).
    rounds, steps : int
        Federated rounds, and local steps in each.
    """

    whole_image_side: int = 128
    max_levels: int = 4
    base_channels: dict[int, int] = field(default_factory=lambda: {2: 8, 3: 4})
    max_channels: dict[int, int] = field(default_factory=lambda: {2: 64, 3: 32})
    patient_share: float = 1 / 3
    min_batch: dict[int, int] = field(default_factory=lambda: {2: 8, 3: 2})
    max_batch: dict[int, int] = field(default_factory=lambda: {2: 32, 3: 8})
    rounds: int = 5
    steps: int = 20


@dataclass(frozen=True)
class PlannerRules:
    """The planner's constants, chosen by measurement on a 2-core CPU (see README).

    Attributes
    ----------
    max_patch_voxels : dict of int to int
        Largest training patch per spatial dimensionality.
    native_patch_side : dict of int to int
        Side of a patch at native resolution when whole images do not fit.
    whole_image_side : int
        Longest side a 2D image is resized to when its structures are thick enough.
    min_thickness : float
        Structures stay at least this many pixels thick after resizing (downsampling:
        about this many, and at least two thirds of it).
    max_downsample : int
        Largest whole factor a volume's finest axes are shrunk by.
    min_bottleneck : dict of int to int
        Smallest side of the network's deepest feature map.
    max_levels : int
        Resolution levels of the U-Net at most.
    base_channels, max_channels : dict of int to int
        Width of the first level, doubled per level up to the maximum.
    batch_size : dict of int to int
        Patches per optimiser step.
    voxels_per_site : dict of int to int
        Patch voxels a site processes over the whole run (sets the number of steps).
    rounds : int
        Federated rounds; the steps are spread evenly over them.
    max_rounds : int
        Rounds at most when the budget holds more than ``rounds x max_steps`` steps
        (small patches): extra rounds of ``max_steps`` each, up to this many.
    min_steps, max_steps : int
        Bounds of the local steps per round.
    dark_fraction_fov : float
        Above this share of dark voxels, normalisation ignores the dark frame.
    learning_rate : float
        Peak learning rate of the cosine schedule.
    finetune_every : int
        The deployed fine-tune takes one round's steps for every this many rounds
        of the budget, and at least one round's; the federation runs the rounds
        left.
    private : PrivateRules
        What changes when a site trains under DP-SGD.
    """

    max_patch_voxels: dict[int, int] = field(default_factory=lambda: {2: 256 * 256,
                                                                      3: 64 * 64 * 48})
    native_patch_side: dict[int, int] = field(default_factory=lambda: {2: 96, 3: 64})
    whole_image_side: int = 256
    min_thickness: float = 12.0
    max_downsample: int = 4
    min_bottleneck: dict[int, int] = field(default_factory=lambda: {2: 8, 3: 4})
    max_levels: int = 5
    base_channels: dict[int, int] = field(default_factory=lambda: {2: 16, 3: 8})
    max_channels: dict[int, int] = field(default_factory=lambda: {2: 256, 3: 128})
    batch_size: dict[int, int] = field(default_factory=lambda: {2: 8, 3: 2})
    voxels_per_site: dict[int, int] = field(default_factory=lambda: {2: 800 * 8 * 256 * 256,
                                                                     3: 1600 * 2 * 64 * 64 * 48})
    rounds: int = 10
    max_rounds: int = 30
    min_steps: int = 20
    max_steps: int = 150
    dark_fraction_fov: float = 0.15
    learning_rate: float = 2e-3
    finetune_every: int = 6
    private: PrivateRules = field(default_factory=PrivateRules)

    def under_dp(self) -> PlannerRules:
        """Return these rules with the private plan's resolution, network and schedule."""
        p = self.private
        return replace(self, whole_image_side=p.whole_image_side, max_levels=p.max_levels,
                       base_channels=p.base_channels, max_channels=p.max_channels,
                       rounds=p.rounds, max_rounds=p.rounds, min_steps=p.steps,
                       max_steps=p.steps)


@dataclass(frozen=True)
class Plan:
    """A training configuration derived from the sites' fingerprints.

    Attributes
    ----------
    spatial_dims, in_channels : int
        Image geometry every site shares.
    resize : tuple of int
        Size every case is resampled to before training and inference, or ``()``
        to keep native resolution.
    patch_size : tuple of int
        Training patch (the whole resized image when it fits).
    channels : tuple of int
        U-Net widths per level.
    batch_size, local_steps, num_server_rounds : int
        Optimisation budget.
    normalization : str
        ``zscore`` or ``zscore-fov`` (statistics over the field of view only).
    learning_rate : float
        Peak learning rate of the cosine schedule.
    budget_rounds : int
        Rounds of ``local_steps`` each site's budget holds: ``num_server_rounds``
        plus the rounds the deployed fine-tune took out of it. A method that does
        not fine-tune (a site alone, pooled training) gets this many rounds.
    personalization : str
        What each site deploys: ``finetune`` (the final global model fine-tuned on
        the site's own cases), or ``none`` under DP-SGD, whose model is the private
        one, and after a one-round budget.
    site_weighting : str
        How the strategy weights each site's update: ``equal`` without DP-SGD,
        ``cases`` under it.
    downsample : tuple of int
        Whole factors per axis every case is shrunk by (``()``: none); planned
        for thick structures in volumes with a physical spacing, where ``resize``
        is not.
    num_classes : int
        Output classes, background included: the most any site's labels code.
    class_conflict : str
        Why ``num_classes`` cannot serve every site (``""``: it can): some sites'
        labels code several structures, others' one foreground by threshold.
        :meth:`to_run_config` refuses with it unless the run config sets
        ``num-classes``.
    reasons : tuple of str
        One line per decision, printed by ``fedseg plan``.
    """

    spatial_dims: int
    in_channels: int
    resize: tuple[int, ...]
    patch_size: tuple[int, ...]
    channels: tuple[int, ...]
    batch_size: int
    local_steps: int
    num_server_rounds: int
    normalization: str
    learning_rate: float
    budget_rounds: int
    personalization: str = "none"
    site_weighting: str = "cases"
    downsample: tuple[int, ...] = ()
    num_classes: int = 2
    class_conflict: str = ""
    reasons: tuple[str, ...] = ()

    @property
    def finetune_steps(self) -> int:
        """Steps of the deployed fine-tune: the rounds it took out of the budget (0: none)."""
        return (self.budget_rounds - self.num_server_rounds) * self.local_steps

    def finetune_rounds(self, rounds: int, *, budget: bool = False) -> int:
        """Return the deployed fine-tune's rounds for a run of ``rounds``, in the plan's proportion.

        Parameters
        ----------
        rounds : int
            The run's federated rounds; with ``budget``, its whole budget in rounds
            (federated rounds plus the fine-tune's, as :attr:`budget_rounds`).
        budget : bool
            Count ``rounds`` as a budget, which the fine-tune then takes out of
            and never wholly (at most ``rounds - 1``).

        Returns
        -------
        int
            0 when the plan does not fine-tune; the plan's own fine-tune for the
            plan's rounds; otherwise at least one round (retina, 5 per 25 federated
            rounds or per 30 of budget: 3 rounds give 1, 50 give 10).
        """
        tuning = self.budget_rounds - self.num_server_rounds
        base = self.budget_rounds if budget else self.num_server_rounds
        if not tuning or rounds == base or rounds < 1:
            return tuning  # no rounds at all are the run-config parser's to refuse
        # Floored, as make_plan takes budget // finetune_every rounds.
        scaled = max(1, rounds * tuning // base)
        return min(rounds - 1, scaled) if budget else scaled

    def to_run_config(self, values: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """Return the planned values under their run-config keys.

        The deployed fine-tune is whole rounds of local steps, in the plan's
        proportion to the federated rounds. When the user's run config ``values``
        sets ``local-steps`` or ``num-server-rounds``, it follows them: a quick run
        of 3 rounds of 3 steps is not followed by a 750-step fine-tune, and a run of
        twice the rounds fine-tunes twice as long (at least one round when the plan
        fine-tunes at all). A value that is no integer is left to the run-config
        parser to refuse. A ``resize`` or ``downsample`` the user sets replaces
        the plan's other one, since only one of them may resample the cases.

        Raises
        ------
        PlanningError
            The sites' labels code different things (:attr:`class_conflict`) and
            ``values`` does not set ``num-classes``.
        """
        if self.class_conflict and (values or {}).get("num-classes", "auto") == "auto":
            raise PlanningError(self.class_conflict)
        steps = _user_int(values, "local-steps", self.local_steps)
        rounds = _user_int(values, "num-server-rounds", self.num_server_rounds)
        finetune = self.finetune_rounds(rounds) * steps
        resize = _csv(self.resize) if self.resize else "none"
        downsample = _csv(self.downsample) if self.downsample else "none"
        # Both resample every case: the user's choice of one replaces the plan's other.
        if _resamples(values, "resize"):
            downsample = "none"
        if _resamples(values, "downsample"):
            resize = "none"
        return {
            "in-channels": self.in_channels,
            "num-classes": self.num_classes,
            "resize": resize,
            "downsample": downsample,
            "patch-size": _csv(self.patch_size),
            "channels": _csv(self.channels),
            "batch-size": self.batch_size,
            "local-steps": self.local_steps,
            "num-server-rounds": self.num_server_rounds,
            "normalization": self.normalization,
            "learning-rate": self.learning_rate,
            "lr-schedule": "cosine",
            "personalization": self.personalization,
            "finetune-steps": finetune,
            "site-weighting": self.site_weighting,
        }


def overridden(planned: Mapping[str, Any], values: Mapping[str, Any],
               skip: Sequence[str] = ()) -> list[str]:
    """Return ``key=value (planned X)`` for each planned key ``values`` sets otherwise.

    ``auto`` and an absent key leave the plan's value; spaces in a list do not
    count as a difference.
    """
    def text(value: Any) -> str:
        return str(value).replace(" ", "")

    return [f"{key}={values[key]!r} (planned {planned[key]!r})" for key in planned
            if key not in skip and key in values and values[key] != "auto"
            and text(values[key]) != text(planned[key])]


def _resamples(values: Mapping[str, Any] | None, key: str) -> bool:
    """Whether the user's ``values`` set ``key`` (resize, downsample) to resample."""
    user = (values or {}).get(key, "auto")
    return user not in ("auto", "none", "", (), None)


def _user_int(values: Mapping[str, Any] | None, key: str, planned: int) -> int:
    """Return the user's positive integer ``key`` in ``values``, else ``planned``."""
    user = (values or {}).get(key, "auto")
    if user == "auto" or isinstance(user, bool):
        return planned
    with contextlib.suppress(TypeError, ValueError):
        if int(user) > 0:
            return int(user)
    return planned


def _csv(values: Sequence[int]) -> str:
    return ",".join(str(v) for v in values)


def combine(fingerprints: Sequence[Fingerprint]) -> Fingerprint:
    """Merge the sites' fingerprints, each weighted by its number of cases.

    ``dp_patients`` of the result is the smallest positive one (0 when no site
    trains under DP); ``classes`` the largest, since a site may lack a structure
    that another's labels hold (:func:`make_plan` checks that they agree).

    Raises
    ------
    PlanningError
        No fingerprints, or sites that disagree on dimensionality or channels.
    """
    if not fingerprints:
        raise PlanningError("no site sent a fingerprint; start the sites or set every planned "
                            "key in the run config")
    first = fingerprints[0]
    for fp in fingerprints[1:]:
        if (fp.spatial_dims, fp.channels) != (first.spatial_dims, first.channels):
            raise PlanningError(
                f"sites disagree: {first.spatial_dims}D with {first.channels} channel(s) at one "
                f"site, {fp.spatial_dims}D with {fp.channels} at another; every site must hold "
                "images of the same kind")
    total = sum(fp.num_cases for fp in fingerprints)
    weights = [fp.num_cases / total if total else 1 / len(fingerprints) for fp in fingerprints]

    def mean(values: Sequence[float]) -> float:
        return sum(w * v for w, v in zip(weights, values, strict=True))

    dims = first.spatial_dims
    return Fingerprint(
        num_cases=total, spatial_dims=dims, channels=first.channels,
        shape=tuple(round(mean([fp.shape[i] for fp in fingerprints])) for i in range(dims)),
        spacing=tuple(mean([fp.spacing[i] for fp in fingerprints]) for i in range(dims)),
        has_spacing=all(fp.has_spacing for fp in fingerprints),
        foreground_fraction=mean([fp.foreground_fraction for fp in fingerprints]),
        thickness=mean([fp.thickness for fp in fingerprints]),
        dark_fraction=mean([fp.dark_fraction for fp in fingerprints]),
        fg_intensity=(mean([fp.fg_intensity[0] for fp in fingerprints]),
                      mean([fp.fg_intensity[1] for fp in fingerprints]),
                      mean([fp.fg_intensity[2] for fp in fingerprints])),
        # The smallest private site: its noise is the largest for a given batch.
        dp_patients=min((fp.dp_patients for fp in fingerprints if fp.dp_patients), default=0),
        classes=max(fp.classes for fp in fingerprints),
    )


def _round_down(value: float, multiple: int) -> int:
    return max(multiple, int(value // multiple) * multiple)


def _levels(patch: Sequence[int], rules: PlannerRules, dims: int) -> int:
    """Resolution levels so that the deepest feature map keeps ``min_bottleneck`` voxels."""
    downs = math.floor(math.log2(max(1.0, min(patch) / rules.min_bottleneck[dims])))
    return max(2, min(rules.max_levels, downs + 1))


def working_size(shape: Sequence[int], resize: Sequence[int],
                 downsample: Sequence[int]) -> tuple[int, ...]:
    """Return the size a case of ``shape`` is resampled to for the network.

    Parameters
    ----------
    shape : sequence of int
        The case's own spatial size.
    resize : sequence of int
        A fixed size for every case (``()``: none).
    downsample : sequence of int
        Whole factors per axis (``()``: none); a side shrinks to ``ceil(side /
        factor)``, so no side becomes 0.

    Returns
    -------
    tuple of int
        ``resize`` when set, else the downsampled shape, else ``()`` (the case's own).
    """
    if resize:
        return tuple(resize)
    if downsample:
        return tuple(-(-int(side) // int(f)) for side, f in zip(shape, downsample, strict=True))
    return ()


def _downsample_factors(fp: Fingerprint, rules: PlannerRules) -> tuple[int, ...]:
    """Whole factors per axis that keep structures about ``min_thickness`` thick.

    The finest axes shrink by ``thickness / min_thickness`` rounded half up, at
    least 2 (called from 1.5 times ``min_thickness``, as a 2D image is resized
    from 1.5, so structures keep at least 9 voxels, and about ``min_thickness``
    above that) and at most ``max_downsample``; a coarser axis by proportionally
    less, so an anisotropic volume (CT of 0.7 x 0.7 x 5 mm) keeps its few thick
    slices.
    """
    # Half up, not to even: 30 voxels over 12 is a factor of 3.
    factor = min(rules.max_downsample, max(2, int(fp.thickness / rules.min_thickness + 0.5)))
    finest = min(fp.spacing)
    return tuple(max(1, int(factor * finest / s + 0.5)) if s > 0 else factor
                 for s in fp.spacing)


def _shrink_to_budget(shape: Sequence[int], budget: int) -> list[int]:
    """Halve the longest axis (nnU-Net shrinks the largest relative axis) until it fits."""
    patch = list(shape)
    while math.prod(patch) > budget:
        axis = max(range(len(patch)), key=lambda i: patch[i])
        patch[axis] = max(8, patch[axis] * 3 // 4)
    return patch


def make_plan(fingerprints: Sequence[Fingerprint], rules: PlannerRules | None = None) -> Plan:
    """Plan resolution, patch, network, normalisation and schedule for all sites.

    Parameters
    ----------
    fingerprints : sequence of Fingerprint
        One per site.
    rules : PlannerRules, optional
        The planner's constants; the defaults suit a 2-core CPU.

    Returns
    -------
    Plan
        The configuration every site trains with; a run config may override any value.
    """
    rules = rules or PlannerRules()
    fp = combine(fingerprints)
    dims = fp.spatial_dims
    reasons: list[str] = [f"{len(fingerprints)} site(s), {fp.num_cases} training cases, "
                          f"{dims}D, {fp.channels} channel(s), median size "
                          f"{'x'.join(map(str, fp.shape))}"]
    num_classes = max(2, fp.classes)
    thresholded = sum(1 for f in fingerprints if f.classes == 0)
    class_conflict = ""
    if num_classes > 2:
        reasons.append(f"labels code {num_classes - 1} structures (values 0 to "
                       f"{num_classes - 1}): one output per class, Dice averaged over them")
    if num_classes > 2 and thresholded:
        class_conflict = (
            f"{thresholded} site(s) label one foreground (0/255, a soft mask or codes with "
            f"gaps) while others code {num_classes} classes (0 to {num_classes - 1}): remap "
            f"those sites' labels to 0..{num_classes - 1} (or 0/1), or set num-classes in the "
            "run config (2 merges every structure into one foreground)")
    private = sum(1 for f in fingerprints if f.dp_patients)
    if private:
        rules = rules.under_dp()
        reasons.append(f"{private} site(s) train under DP-SGD, the smallest with "
                       f"{fp.dp_patients} patients: a smaller network on smaller images, "
                       "large batches of patients, fewer steps")
    resize: tuple[int, ...] = ()
    downsample: tuple[int, ...] = ()
    work_shape = list(fp.shape)
    factor = 1.0
    if dims == 2 and not fp.has_spacing:
        factor = min(max(fp.shape) / rules.whole_image_side, fp.thickness / rules.min_thickness)
    if factor >= 1.5:
        # Structures are thick: a whole downsampled image gives the network the
        # global context (both lungs, the mediastinum) that patches never see.
        work_shape = [max(16, round(s / factor / 16) * 16) for s in fp.shape]
        resize = tuple(work_shape)
        reasons.append(f"structures are {fp.thickness:.0f} px thick: resize to "
                       f"{'x'.join(map(str, resize))} (factor {factor:.2f}); Dice is still "
                       "measured at full resolution")
    elif (dims == 3 or fp.has_spacing) and fp.thickness >= 1.5 * rules.min_thickness \
            and math.prod(fp.shape) > rules.max_patch_voxels[dims]:
        # Thick structures in a volume larger than a patch: shrinking each case by a
        # whole factor (nnU-Net's low-resolution stage) lets a patch hold the whole
        # structure, and keeps each case's proportions, which a fixed size would
        # not. Left atrium MRI, one site alone, 2190 steps, 3 seeds: 0.503 native,
        # 0.887 with each volume halved.
        downsample = _downsample_factors(fp, rules)
        work_shape = list(working_size(fp.shape, (), downsample))
        reasons.append(f"structures are {fp.thickness:.0f} voxels thick: shrink every case by "
                       f"{'x'.join(map(str, downsample))} (median "
                       f"{'x'.join(map(str, work_shape))}); Dice is still measured at full "
                       "resolution")
    else:
        reasons.append(f"structures are {fp.thickness:.1f} px thick: keep native resolution")
    if math.prod(work_shape) <= rules.max_patch_voxels[dims]:
        patch = list(work_shape)
        reasons.append("the whole (resized) image fits in one patch")
    elif resize:
        patch = _shrink_to_budget(work_shape, rules.max_patch_voxels[dims])
    else:
        side = rules.native_patch_side[dims]
        patch = _shrink_to_budget([min(s, side) if dims == 2 else s for s in work_shape],
                                  rules.max_patch_voxels[dims])
        if dims == 3:
            patch = [min(p, side) if i < 2 else p for i, p in enumerate(patch)]
    levels = _levels(patch, rules, dims)
    multiple = 2 ** (levels - 1)
    patch = [_round_down(p, multiple) for p in patch]
    if resize and patch == list(work_shape):
        resize = tuple(patch)
    elif not resize or patch != list(resize):
        reasons.append(f"patches of {'x'.join(map(str, patch))}, half centred on foreground")
    channels = tuple(min(rules.max_channels[dims], rules.base_channels[dims] * 2 ** i)
                     for i in range(levels))
    reasons.append(f"U-Net with {levels} levels ({_csv(channels)}): the deepest feature map is "
                   f"{'x'.join(str(p // multiple) for p in patch)}")
    batch = rules.batch_size[dims]
    if private:
        p = rules.private
        batch = min(p.max_batch[dims], max(p.min_batch[dims],
                                           math.floor(fp.dp_patients * p.patient_share)))
    total_steps = rules.voxels_per_site[dims] / (batch * math.prod(patch))
    rounds = rules.rounds
    if total_steps / rounds > rules.max_steps:
        # Small patches: the budget holds more steps than rounds x max_steps. More
        # rounds of at most max_steps keep local drift as measured (retina, global
        # model: 24 x 150 reached 0.755 where 10 x 150 reached 0.722).
        rounds = min(rules.max_rounds, math.ceil(total_steps / rules.max_steps))
    steps = int(min(rules.max_steps, max(rules.min_steps, round(total_steps / rounds))))
    normalization = "zscore-fov" if fp.dark_fraction > rules.dark_fraction_fov else "zscore"
    budget_rounds, finetune = rounds, 0
    # The deployed fine-tune grows with the run (retina, from a 25-round global
    # model, one seed: 0.777 after 150 steps, 0.782 after 750, 0.787 after 1500)
    # and comes out of the budget: the deployed model has had the steps a site
    # alone would take, as benchmarks.federation compares them. A one-round budget
    # leaves no round to take, so its sites deploy the global model.
    tuning_rounds = 0 if private else min(rounds - 1, max(1, rounds // rules.finetune_every))
    if tuning_rounds:
        finetune = steps * tuning_rounds
        rounds -= tuning_rounds
    unit = " patients" if private else ""
    dp_rate = " (DP-SGD sites: from dp-learning-rate)" if private else ""
    reasons.append(f"{rounds} rounds x {steps} steps of batch {batch}{unit}, cosine "
                   f"learning rate from {rules.learning_rate:g}{dp_rate}")
    reasons.append(f"{fp.dark_fraction:.0%} of pixels are dark: {normalization} normalisation")
    if private:
        # Each site's DP-SGD noise follows from its patients per batch and its own
        # epsilon, which its cases only stand in for (retina at epsilon 8, README).
        site_weighting = "dp-noise"
        reasons.append("updates weighted by the inverse variance of each site's DP-SGD noise: "
                       "the site with the fewest patients, or the smallest epsilon, adds the "
                       "most noise and pulls least")
    else:
        # The global model is every hospital's starting point, so each counts alike
        # (chest X-ray, 3 seeds, the round-8 global model on Montgomery: 0.928-0.939
        # weighted by cases, 0.952-0.956 equally; Shenzhen 0.956-0.957 and 0.955-0.956).
        site_weighting = "equal"
        reasons.append("every site's update weighs alike, whatever its number of cases: a "
                       "small hospital pulls the global model as hard as a large one")
    if private:
        personalization = "none"
        reasons.append("each site deploys the global model, the one DP-SGD trained (a local "
                       "fine-tune would see its cases without noise)")
    elif not finetune:
        personalization = "none"
        reasons.append("each site deploys the global model: a one-round budget leaves no "
                       "steps for a local fine-tune")
    else:
        # Measured on retina (8 rounds, one seed): 0.713 global, 0.742 after a local
        # fine-tune of 100 steps; the hospital keeps what fits its own scanner.
        personalization = "finetune"
        reasons.append(f"each site deploys the final global model fine-tuned for {finetune} "
                       f"steps on its own cases ({rounds * steps + finetune} steps per site "
                       "in all)")
    return Plan(
        spatial_dims=dims, in_channels=fp.channels, resize=resize, patch_size=tuple(patch),
        channels=channels, batch_size=batch, local_steps=steps,
        num_server_rounds=rounds, normalization=normalization,
        learning_rate=rules.learning_rate, personalization=personalization,
        site_weighting=site_weighting, budget_rounds=budget_rounds, downsample=downsample,
        num_classes=num_classes, class_conflict=class_conflict, reasons=tuple(reasons),
    )
