"""Load a site in a fresh process as a SuperNode's ClientApp would; print what it decoded.

Used by test_decode_once: ``python -m tests.cached_site_process SITE STATE MODE`` with
MODE ``fingerprint`` (a planning round) or ``train`` (a trainer built and evaluated).
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import client.data_contract as data_contract
import client.imaging as imaging
import client.preprocess as preprocess
from client.config import SiteConfig
from client.fingerprint import fingerprint_site
from client.trainer import SiteTrainer
from shared.config import ModelSpec

SPEC = ModelSpec(channels=(8, 16), patch_size=(16, 16), resize=(16, 16))


def main() -> None:
    site_dir, state_dir, mode = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
    site = SiteConfig(data_path=site_dir, state_dir=state_dir, device="cpu", num_threads=1)
    digest = ""
    if mode == "fingerprint":
        fingerprint_site(site)
    else:
        trainer = SiteTrainer(site, SPEC)
        trainer.evaluate(trainer.weights())
        digest = cases_digest([*trainer.data.train, *trainer.data.val])
    print(json.dumps({"decodes": imaging.DECODES, "prepared": preprocess.PREPARED,
                      "digest": digest}))


def cases_digest(cases: list[data_contract.LoadedCase]) -> str:
    """Return a hash of every case's id, image and label, dtype and shape included."""
    digest = hashlib.sha256()
    for case in cases:
        for array in (case.image, case.label, case.source.array):
            digest.update(f"{case.case_id}{array.dtype}{array.shape}".encode())
            digest.update(array.tobytes())
    return digest.hexdigest()


if __name__ == "__main__":
    main()
