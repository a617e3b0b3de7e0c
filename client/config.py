"""A hospital's own settings (its SuperNode's node config), declared once per key.

Only the site sets them; nothing in a message can change them. Misspelt keys are
refused, so a typo such as ``dp-enabeld`` never silently trains without privacy.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from client.private_gradients import GRAD_SAMPLE_MODES
from shared import settings
from shared.privacy import SitePrivacy
from shared.settings import (
    NODE_CONFIG,
    Source,
    check,
    choice,
    flag,
    integer,
    number,
    path,
    section,
    text,
)

# Keys Flower itself puts into a node config (simulation engine).
FLOWER_NODE_KEYS = frozenset({"partition-id", "num-partitions"})


def patient_pattern_problem(pattern: str) -> str | None:
    """Return why ``pattern`` cannot name patients (``None`` when it can, or is empty)."""
    if not pattern:
        return None
    try:
        compiled = re.compile(pattern)
    except re.error as exc:
        return f"is not a valid regex ({exc})"
    if compiled.groups < 1:
        return "needs one capture group: the patient id, e.g. '^(\\w+?)_\\d+$'"
    return None


def _device_problem(device: str) -> str | None:
    if re.fullmatch(r"auto|cpu|cuda(:\d+)?", device):
        return None
    return f"must be auto, cpu, cuda or cuda:N, got {device!r}"


@dataclass(frozen=True)
class SiteConfig:
    """A hospital's own settings; each field's declaration is its documentation."""

    SOURCE: ClassVar[Source] = NODE_CONFIG

    data_path: Path = path("data-path", Path(), "the site's data folder (Decathlon layout; "
                           "read-only is enough)", required=True)
    site_name: str = text("site-name", "", "name in the server's metrics history",
                          shown_default="the data folder's name")
    state_dir: Path = path("state-dir", Path(), "the site's own state: local layers and the "
                           "privacy ledger (back it up, never share it), and `cache/` of "
                           "decoded cases (safe to delete)",
                           shown_default="`fedseg-state/<site-name>`")
    device: str = text("device", "auto", "`auto` (CUDA when present), `cpu`, `cuda` or "
                       "`cuda:N`", rule=_device_problem, lower=True)
    val_fraction: float = number("val-fraction", 0.2, "share of patients held out for "
                                 "validation, chosen deterministically", minimum=0.0,
                                 maximum=1.0, exclusive_maximum=True)
    patient_pattern: str = text("patient-pattern", "", "regex whose first group is the patient "
                                "id of a case's file name", rule=patient_pattern_problem,
                                shown_default="none")
    num_threads: int = integer("num-threads", 0, "CPU threads for PyTorch; 0 keeps its default",
                               minimum=0)
    amp: bool = flag("amp", False, "mixed precision on CUDA: bfloat16 where the GPU has it "
                     "(also under DP-SGD), else float16 with loss scaling (not under DP-SGD)")
    seed: int = integer("seed", 0, "site seed, mixed with the round number for local training")
    dp_grad_sample_mode: str = choice(
        "dp-grad-sample-mode", "vmap", "how DP-SGD computes each patient's gradient (`vmap`: "
        "torch.func, the fastest measured; the others are Opacus's grad-sample modes)",
        choices=GRAD_SAMPLE_MODES)
    privacy: SitePrivacy = section(SitePrivacy)

    def __post_init__(self) -> None:
        if not self.site_name:
            object.__setattr__(self, "site_name", self.data_path.name or "site")
        if self.state_dir == Path():
            object.__setattr__(self, "state_dir", Path("fedseg-state") / self.site_name)
        check(self)

    @property
    def cache_dir(self) -> Path:
        """The site's disk cache of decoded and prepared cases (:mod:`client.case_cache`).

        Inside the state dir, so it stays at the site; deleting it is always safe.
        """
        return self.state_dir / "cache"

    @classmethod
    def from_node_config(cls, values: Mapping[str, Any]) -> SiteConfig:
        """Parse and validate a SuperNode's node config; a misspelt key is an error."""
        settings.refuse_unknown(values, settings.keys(cls), NODE_CONFIG, "site setting",
                                also_allowed=FLOWER_NODE_KEYS)
        return settings.parse(cls, values, NODE_CONFIG)
