"""``fedseg site check``: what hospital IT runs before joining a federation.

Reads every case through the same data contract the trainer uses and reports
what it found, without sending anything anywhere. Given the daemon's node config,
it also reads the site's state folder (privacy ledger, local layers, personal model)
exactly as a training round would.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from client.config import SiteConfig
from client.data_contract import discover_cases, load_case, split_cases
from client.fingerprint import label_classes
from client.imaging import read_image
from client.label_checks import binary_values_problem, format_values, label_values
from shared.errors import DataError, FedsegError
from shared.privacy import Mechanism


@dataclass(frozen=True)
class CaseReport:
    """One case as the trainer would see it, or the problem that stops it."""

    case_id: str
    patient_id: str
    split: str
    shape: str
    spacing: str
    label_values: str
    problem: str = ""


def check_site(data: Path, in_channels: int, num_classes: int, spatial_dims: int,
               val_fraction: float = 0.2, patient_pattern: str = "") -> list[CaseReport]:
    """Return one report per case; folder-level problems raise :class:`DataError`.

    Each case goes through the trainer's ``load_case`` (which refuses what would
    silently corrupt training) and then :mod:`client.label_checks` (label values
    a binary task would merge).
    """
    refs = discover_cases(data, patient_pattern)
    try:
        _, val = split_cases(refs, val_fraction)
        val_ids = {r.case_id for r in val}
    except DataError:
        val_ids = set()
    reports = []
    for ref in refs:
        split = "val" if ref.case_id in val_ids else "train"
        try:
            case = load_case(ref, in_channels, num_classes, spatial_dims)
            values = label_values(read_image(ref.label), spatial_dims, ref.label)
            spacing = "x".join(f"{s:g}" for s in case.source.spacing)
            shape = "x".join(str(s) for s in case.image.shape[1:])
            problem = binary_values_problem(values, num_classes)
            reports.append(CaseReport(ref.case_id, ref.patient_id, split, shape, spacing,
                                      format_values(values),
                                      f"{ref.label}: {problem}" if problem else ""))
        except DataError as exc:
            reports.append(CaseReport(ref.case_id, ref.patient_id, split, "-", "-", "-",
                                      str(exc)))
    return reports


def planned_classes(data: Path, spatial_dims: int, val_fraction: float = 0.2,
                    patient_pattern: str = "") -> int:
    """Return the classes the planner would give this site alone: from its training labels.

    As the site's fingerprint counts them (:func:`client.fingerprint.label_classes`),
    at least 2. A label that cannot be read is left out: :func:`check_site`
    reports it.
    """
    refs = discover_cases(data, patient_pattern)
    with contextlib.suppress(DataError):  # too few cases to split: all of them count
        refs = split_cases(refs, val_fraction)[0]
    codes: list[np.ndarray] = []
    for ref in refs:
        with contextlib.suppress(DataError):
            codes.append(label_values(read_image(ref.label), spatial_dims, ref.label))
    return max(2, label_classes(np.concatenate(codes))) if codes else 2


def format_reports(reports: list[CaseReport]) -> list[str]:
    """Return the table lines and a closing summary line."""
    lines = [f"{'case':<24} {'patient':<20} {'split':<5} {'shape':<14} {'spacing':<16} "
             f"{'label values':<14} problem"]
    for r in reports:
        lines.append(f"{r.case_id:<24} {r.patient_id:<20} {r.split:<5} {r.shape:<14} "
                     f"{r.spacing:<16} {r.label_values:<14} {r.problem or 'ok'}")
    bad = sum(1 for r in reports if r.problem)
    lines.append(f"{len(reports)} cases, {bad} with problems")
    return lines


def read_site_config(path: Path) -> SiteConfig:
    """Parse a SuperNode node-config TOML file exactly as ``flower-supernode`` reads it."""
    from flwr.common.config import parse_config_args

    if path.suffix != ".toml":
        raise DataError(path, "the node config must be a .toml file",
                        "flower-supernode only reads --node-config files ending in .toml")
    if not path.is_file():
        raise DataError(path, "node config not found",
                        "copy deploy/config/site.example.toml there and edit it")
    try:
        values = parse_config_args([str(path)])
    except Exception as exc:  # tomli's decode errors carry the line and column
        raise DataError(path, f"not valid TOML ({exc})",
                        "write one 'key = value' per line, strings in quotes") from None
    try:
        return SiteConfig.from_node_config(values)
    except FedsegError as exc:
        raise FedsegError(f"{path}: {exc}") from None


def check_state_dir(state_dir: Path, delta: float, accountant: Mechanism) -> list[str]:
    """Read the site's privacy ledger, local layers and personal model; one line each.

    A missing folder or file is a site that has not trained yet, not a problem.
    No lock is taken: the ledger is only ever replaced whole (atomic rename), so
    this reads the old ledger or the new one.

    Raises
    ------
    DataError
        "damaged ledger", "damaged local layers" or "damaged personal model", as a
        training round would stop with; or ``state_dir`` is not a folder.
    """
    # Imported here: they load Opacus and PyTorch, which checking the data alone
    # (`fedseg site check --data`) does not need.
    from client.personal import read_personal_model
    from client.privacy_ledger import PrivacyLedger
    from client.site_state import read_local_layers

    if state_dir.exists() and not state_dir.is_dir():
        raise DataError(state_dir, "state-dir is not a folder",
                        "set state-dir in the node config to this site's state folder")
    ledger = PrivacyLedger.load(state_dir)
    if ledger.history:
        steps = sum(k for _, _, k in ledger.history)
        epsilon = ledger.epsilon(delta, accountant)
        ledger_line = (f"privacy ledger ok: {len(ledger.rounds)} rounds, {steps} steps, "
                       f"epsilon {epsilon:.3f} at delta {delta:g} ({accountant})")
    else:
        ledger_line = "privacy ledger: no DP steps yet"
    layers = read_local_layers(state_dir)
    layers_line = ("local layers: none yet" if layers is None else
                   f"local layers ok: adaptation '{layers[0]}', {len(layers[1])} tensors")
    personal = read_personal_model(state_dir)
    personal_line = ("personal model: none" if personal is None else
                     f"personal model ok: {personal[0]}, round {personal[2].server_round}")
    return [ledger_line, layers_line, personal_line]
