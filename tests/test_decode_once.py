"""A site's images are decoded once per process, whatever reads them."""

from __future__ import annotations

from pathlib import Path

import client.imaging as imaging
from client.config import SiteConfig
from client.data_contract import discover_cases
from client.fingerprint import fingerprint_site
from client.trainer import SiteData
from shared.config import ModelSpec
from simulations.phantoms import write_synthetic_federation


def test_fingerprint_preflight_and_training_share_one_decode(tmp_path: Path) -> None:
    folder = write_synthetic_federation(tmp_path, num_sites=1, cases_per_site=6,
                                        shape=(32, 32))[0]
    site = SiteConfig(data_path=folder)
    spec = ModelSpec(patch_size=(32, 32))
    files = 2 * len(discover_cases(folder))        # an image and a label per case
    imaging.forget_decoded()
    before = imaging.DECODES
    fingerprint_site(site)                          # the planning round reads the train split
    SiteData.load(site, spec)                       # the preflight
    SiteData.load(site, spec)                       # a trainer built for the next round
    assert imaging.DECODES - before == files


def test_a_changed_file_is_decoded_again(tmp_path: Path) -> None:
    folder = write_synthetic_federation(tmp_path, num_sites=1, cases_per_site=4,
                                        shape=(32, 32))[0]
    image = discover_cases(folder)[0].image
    imaging.forget_decoded()
    before = imaging.DECODES
    imaging.read_image(image)
    imaging.read_image(image)
    data = image.read_bytes()
    image.write_bytes(data + b"")                   # same bytes, new modification time
    import os
    stat = image.stat()
    os.utime(image, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    imaging.read_image(image)
    assert imaging.DECODES - before == 2
