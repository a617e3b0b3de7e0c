"""Site folders on this machine: find them, probe their layout, plan a run for them.

``fedseg plan`` and ``fedseg site check`` need only this, so it imports neither
PyTorch, MONAI nor Flower (tests/test_code_quality.py checks): those commands
start in a fraction of a second instead of loading the training stack.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from client.config import SiteConfig
from client.data_contract import DATASET_JSON, IMAGES_DIR, declared_channels, discover_cases
from client.fingerprint import fingerprint_site
from client.imaging import read_image
from shared import settings
from shared.errors import ConfigError, DataError
from shared.planning import Fingerprint, Plan, make_plan


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

    A NIfTI's 4th axis is taken for channels only when the site's ``dataset.json``
    names that many (:func:`client.data_contract.declared_channels`): it may hold
    time points, and otherwise only an explicit ``in-channels`` says they are
    channels (the data contract refuses the series, with that fix).
    """
    image = read_image(discover_cases(site)[0].image, cache)
    spatial = image.array.ndim
    channels = 1
    if image.fmt == "nifti":
        if spatial == 4:
            spatial = 3
            if image.array.shape[3] == declared_channels(site):
                channels = image.array.shape[3]
    elif spatial == 3:
        spatial, channels = 2, min(image.array.shape[-1], 3)
    return spatial, channels


#: Node-config keys ``fedseg simulate`` sets for each site itself.
PER_SITE_KEYS = frozenset({"data-path", "site-name", "state-dir", "seed"})
SITE_CONFIG_FLAG = "--site-config"


def _site_source(path: Path) -> settings.Source:
    return settings.Source(f"{SITE_CONFIG_FLAG} {path}", f"fix it in {path}")


def check_site_settings(values: Mapping[str, Any], source: settings.Source) -> None:
    """Refuse node-config ``values`` a simulated site cannot take, naming the key.

    Every key must be a :class:`client.config.SiteConfig` setting, validated by its
    own declaration, and none of those the simulation sets per site.
    """
    for key in sorted(values):
        if key in PER_SITE_KEYS:
            raise ConfigError(source.name, key, "is set by fedseg simulate for each site (its "
                              "data folder, name, state folder in the run folder and seed by "
                              "position)", "remove it")
    settings.refuse_unknown(values, settings.keys(SiteConfig) - PER_SITE_KEYS, source,
                            "site setting")
    settings.parse(SiteConfig, {**values, "data-path": "site"}, source)


def read_site_settings(path: Path) -> dict[str, Any]:
    """Return the node-config keys of the TOML file ``path``, for every simulated site.

    Read as ``flower-supernode --node-config`` reads a file, and checked by
    :func:`check_site_settings`.

    Raises
    ------
    FedsegError
        One line naming the file (and the key): missing, not TOML, an unknown,
        per-site or invalid key.
    """
    from flwr.common.config import parse_config_args

    where = f"{SITE_CONFIG_FLAG} {path}"
    if path.suffix != ".toml":
        raise DataError(where, "the site config must be a .toml file",
                        "write node-config keys such as dp-enabled = true into a .toml file")
    if not path.is_file():
        raise DataError(where, "file not found",
                        "pass a .toml file of node-config keys, e.g. dp-enabled = true")
    try:
        values = dict(parse_config_args([str(path)]))
    except Exception as exc:  # tomli's decode errors carry the line and column
        raise DataError(where, f"not valid TOML ({exc})",
                        "write one 'key = value' per line, strings in quotes") from None
    check_site_settings(values, _site_source(path))
    return values


def site_fingerprints(folders: list[Path],
                      site_settings: Mapping[str, Any] | None = None) -> list[Fingerprint]:
    """Return each folder's fingerprint, as the site would send it in the planning round.

    Computed by the same code a site runs (:func:`client.fingerprint.fingerprint_site`),
    with the default validation split and ``site_settings`` (node-config keys every
    site takes, as ``--site-config`` gives them; a DP-SGD site reports its patients).
    Nothing is written: these folders are not sites with a state dir here.
    """
    return [fingerprint_site(settings.parse(SiteConfig, {**(site_settings or {}),
                                                         "data-path": str(folder)},
                                            settings.NODE_CONFIG), disk_cache=False)
            for folder in folders]


def plan_sites(folders: list[Path], site_settings: Mapping[str, Any] | None = None) -> Plan:
    """Plan a run for site folders on this machine, as the ServerApp would from messages.

    The fingerprints are :func:`site_fingerprints`'s; DP-SGD at the sites changes the plan.
    """
    return make_plan(site_fingerprints(folders, site_settings))
