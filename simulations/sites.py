"""Site folders on this machine: find them, probe their layout, plan a run for them.

``fedseg plan`` and ``fedseg site check`` need only this, so it imports neither
PyTorch, MONAI nor Flower (tests/test_code_quality.py checks): those commands
start in a fraction of a second instead of loading the training stack.
"""

from __future__ import annotations

from pathlib import Path

from client.config import SiteConfig
from client.data_contract import DATASET_JSON, IMAGES_DIR, discover_cases
from client.fingerprint import fingerprint_site
from client.imaging import read_image
from shared.errors import DataError
from shared.planning import Plan, make_plan


def find_site_folders(data: Path) -> list[Path]:
    """Return the sub-folders of ``data`` that hold a site (sorted by name).

    A folder that is itself one site (``imagesTr/`` beside ``dataset.json``) and has
    no site sub-folders is a federation of that one site.
    """
    if not data.is_dir():
        raise DataError(data, "data folder not found", "pass a folder with one sub-folder per site")

    def is_site(d: Path) -> bool:
        return (d / DATASET_JSON).is_file() or (d / IMAGES_DIR).is_dir()

    sites = sorted(d for d in data.iterdir() if d.is_dir() and is_site(d))
    if not sites and is_site(data):
        sites = [data]
    if not sites:
        raise DataError(data, f"holds no site folders (sub-folders with {DATASET_JSON} or "
                        f"{IMAGES_DIR}/)",
                        "pass a folder with one Decathlon-layout sub-folder per site")
    return sites


def probe_layout(site: Path, cache: Path | None = None) -> tuple[int, int]:
    """Return (spatial dimensions, channels) of the first image of ``site``.

    ``cache`` is the site's disk cache, for a simulation whose sites read it later.

    A NIfTI's 4th axis is never taken for channels here: it may hold time points,
    and only an explicit ``in-channels`` says they are channels (the data contract
    refuses the series otherwise, with that fix).
    """
    image = read_image(discover_cases(site)[0].image, cache)
    spatial = image.array.ndim
    channels = 1
    if image.fmt == "nifti":
        if spatial == 4:
            spatial = 3
    elif spatial == 3:
        spatial, channels = 2, min(image.array.shape[-1], 3)
    return spatial, channels


def plan_sites(folders: list[Path]) -> Plan:
    """Plan a run for site folders on this machine, as the ServerApp would from messages.

    Each folder's fingerprint is computed by the same code a site runs
    (:func:`client.fingerprint.fingerprint_site`), with the default validation split.
    Nothing is written: these folders are not sites with a state dir here.
    """
    return make_plan([fingerprint_site(SiteConfig(data_path=folder), disk_cache=False)
                      for folder in folders])
