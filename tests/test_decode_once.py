"""A site's images are decoded once per process, whatever reads them, and once per site.

A Flower SuperNode starts a new ClientApp process for every message, so a site's disk
cache (``<state-dir>/cache``, :mod:`client.case_cache`) carries decoded files and
prepared cases from one process to the next.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

import client.imaging as imaging
import client.preprocess as preprocess
from client import case_cache
from client.config import SiteConfig
from client.data_contract import discover_cases, site_split
from client.fingerprint import fingerprint_site
from client.preprocess import prepared_case
from client.trainer import SiteData
from shared.config import ModelSpec
from simulations.phantoms import write_synthetic_federation
from simulations.simulate import preflight, simulated_sites
from simulations.sites import plan_sites
from tests.cached_site_process import SPEC, cases_digest

REPO = Path(__file__).resolve().parents[1]


def _site(tmp_path: Path, cases: int = 6, shape: tuple[int, ...] = (32, 32)) -> SiteConfig:
    folder = write_synthetic_federation(tmp_path / "data", num_sites=1, cases_per_site=cases,
                                        shape=shape)[0]
    return SiteConfig(data_path=folder, state_dir=tmp_path / "state", val_fraction=0.25)


def _new_process() -> None:
    """Forget what this process decoded, as a new ClientApp process starts without it."""
    imaging.forget_decoded()


def _entries(site: SiteConfig) -> list[Path]:
    return sorted(site.cache_dir.rglob("*.npz"))


def test_fingerprint_preflight_and_training_share_one_decode(tmp_path: Path) -> None:
    folder = write_synthetic_federation(tmp_path, num_sites=1, cases_per_site=6,
                                        shape=(32, 32))[0]
    site = SiteConfig(data_path=folder, state_dir=tmp_path / "state")
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
    stat = image.stat()
    os.utime(image, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    imaging.read_image(image)
    assert imaging.DECODES - before == 2


def _in_new_process(site: SiteConfig, mode: str) -> dict[str, object]:
    out = subprocess.run(
        [sys.executable, "-m", "tests.cached_site_process", str(site.data_path),
         str(site.state_dir), mode], cwd=REPO, capture_output=True, text=True, timeout=300,
        check=True)
    result: dict[str, object] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def test_a_second_process_decodes_nothing(tmp_path: Path) -> None:
    site = _site(tmp_path)
    train, val = site_split(site.data_path, "", 0.2)   # cached_site_process's split
    planning = _in_new_process(site, "fingerprint")      # planning round: the train split
    first = _in_new_process(site, "train")               # first round: decodes the rest
    second = _in_new_process(site, "train")              # any later round
    assert planning["decodes"] == 2 * len(train)
    assert first["decodes"] == 2 * len(val) and first["prepared"] == len(train) + len(val)
    assert second["decodes"] == 0 and second["prepared"] == 0
    expected = cases_digest([*(prepared_case(r, SPEC, None, working=True) for r in train),
                             *(prepared_case(r, SPEC, None, working=False) for r in val)])
    assert first["digest"] == second["digest"] == expected


@pytest.mark.parametrize("how", ["resize", "downsample"])
@pytest.mark.parametrize("dims", [2, 3])
def test_cached_cases_equal_decoded_ones(tmp_path: Path, dims: int, how: str) -> None:
    site = _site(tmp_path, cases=4, shape=(32,) * dims)
    spec = ModelSpec(channels=(8, 16), patch_size=(16,) * dims,
                     **{how: (16,) * dims if how == "resize" else (2,) * dims})
    refs = discover_cases(site.data_path)
    plain = [prepared_case(r, spec, None, working=True) for r in refs]
    assert {a.image.shape[1:] for a in plain} == {a.label.shape for a in plain} == {(16,) * dims}
    assert not site.cache_dir.exists()              # no cache given, nothing written
    _new_process()
    cold = [prepared_case(r, spec, site.cache_dir, working=True) for r in refs]
    _new_process()
    decodes, prepared = imaging.DECODES, preprocess.PREPARED
    warm = [prepared_case(r, spec, site.cache_dir, working=True) for r in refs]
    assert (decodes, prepared) == (imaging.DECODES, preprocess.PREPARED)
    for a, b, c in zip(plain, cold, warm, strict=True):
        for x, y, z in ((a.image, b.image, c.image), (a.label, b.label, c.label),
                        (a.source.array, b.source.array, c.source.array)):
            assert x.dtype == y.dtype == z.dtype and np.array_equal(x, y)
            assert np.array_equal(x, z)
        assert a.source.fmt == c.source.fmt and a.source.spacing == c.source.spacing
        assert np.array_equal(a.source.affine, c.source.affine)
        if dims == 3:
            assert isinstance(a.source.header, nib.Nifti1Header)
            assert isinstance(c.source.header, nib.Nifti1Header)
            assert a.source.header.binaryblock == c.source.header.binaryblock
    # Validation cases keep their own size: the cache holds them apart.
    native = [prepared_case(r, spec, site.cache_dir, working=False) for r in refs]
    assert {a.image.shape[1:] for a in native} == {(32,) * dims}


def test_a_changed_file_is_decoded_again_from_the_disk_cache(tmp_path: Path) -> None:
    site = _site(tmp_path)
    spec = ModelSpec(patch_size=(32, 32))
    SiteData.load(site, spec)
    entries = _entries(site)
    image = discover_cases(site.data_path)[0].image
    old = image.stat()
    flipped = np.ascontiguousarray(imaging.read_image(image).array[::-1])
    Image.fromarray(flipped).save(image)            # new content, and a new time below
    os.utime(image, ns=(old.st_atime_ns, old.st_mtime_ns + 5_000_000))
    _new_process()
    decodes, prepared = imaging.DECODES, preprocess.PREPARED
    data = SiteData.load(site, spec)
    assert (imaging.DECODES - decodes, preprocess.PREPARED - prepared) == (1, 1)
    case_id = discover_cases(site.data_path)[0].case_id
    case = next(c for c in (*data.train, *data.val) if c.case_id == case_id)
    assert np.array_equal(case.source.array, flipped)
    assert _entries(site) == entries                # overwritten, not added


def test_a_file_replaced_with_its_old_size_and_time_is_decoded_again(tmp_path: Path) -> None:
    path = tmp_path / "scan.nii"                    # uncompressed: same size for same shape
    cache = tmp_path / "cache"
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 3), dtype=np.int16), np.eye(4)), path)
    _new_process()
    assert not imaging.read_image(path, cache).array.any()
    old = path.stat()
    nib.save(nib.Nifti1Image(np.ones((4, 4, 3), dtype=np.int16), np.eye(4)), path)
    os.utime(path, ns=(old.st_atime_ns, old.st_mtime_ns))   # as cp -p or rsync -t leave it
    assert path.stat().st_size == old.st_size and path.stat().st_mtime_ns == old.st_mtime_ns
    _new_process()
    decodes = imaging.DECODES
    assert imaging.read_image(path, cache).array.all()
    assert imaging.DECODES - decodes == 1


@pytest.mark.parametrize("damage", ["truncated", "flipped byte", "empty", "not a zip"])
def test_a_damaged_entry_is_a_miss_and_is_rewritten(tmp_path: Path, damage: str) -> None:
    site = _site(tmp_path)
    spec = ModelSpec(patch_size=(32, 32))
    good = cases_digest(list(SiteData.load(site, spec).train))
    sizes = {p: p.stat().st_size for p in _entries(site)}
    for path, size in sizes.items():
        data = path.read_bytes()
        if damage == "truncated":
            data = data[: size // 2]
        elif damage == "flipped byte":              # inside the array data: the CRC catches it
            data = data[: size // 2] + bytes([data[size // 2] ^ 0xFF]) + data[size // 2 + 1:]
        else:
            data = b"" if damage == "empty" else b"not a zip file"
        path.write_bytes(data)
    _new_process()
    decodes = imaging.DECODES
    assert cases_digest(list(SiteData.load(site, spec).train)) == good
    assert imaging.DECODES - decodes == len(list(site.cache_dir.glob("decoded/*.npz")))
    assert {p: p.stat().st_size for p in _entries(site)} == sizes
    _new_process()
    decodes = imaging.DECODES
    SiteData.load(site, spec)
    assert decodes == imaging.DECODES


def test_concurrent_writers_leave_a_whole_entry(tmp_path: Path) -> None:
    array = np.arange(2**19, dtype=np.float32)       # 2 MB: a write takes a while
    name, identity = ["same"], ["file", 1]
    seen: list[bool] = []
    stop = threading.Event()

    def write() -> None:
        for _ in range(15):
            case_cache.store(tmp_path, "cases", name, identity, {"a": array})

    def read() -> None:
        while not stop.is_set():
            entry = case_cache.load(tmp_path, "cases", name, identity, ["a"])
            if entry is not None:
                seen.append(bool(np.array_equal(entry["a"], array)))
            elif seen:
                seen.append(False)                  # an entry once whole went missing

    reader = threading.Thread(target=read)
    reader.start()
    writers = [threading.Thread(target=write) for _ in range(4)]
    for t in writers:
        t.start()
    for t in writers:
        t.join()
    stop.set()
    reader.join()
    final = case_cache.load(tmp_path, "cases", name, identity, ["a"])
    assert final is not None and np.array_equal(final["a"], array)
    assert seen and all(seen)
    assert [p.name for p in (tmp_path / "cases").iterdir()] == [
        case_cache.entry_path(tmp_path, "cases", name).name]   # no temporary file left


def test_cache_names_reveal_no_case(tmp_path: Path) -> None:
    site = _site(tmp_path)
    fingerprint_site(site)
    SiteData.load(site, ModelSpec(patch_size=(32, 32)))
    names = [str(p.relative_to(site.cache_dir)) for p in site.cache_dir.rglob("*")]
    assert len(names) > 2 * len(discover_cases(site.data_path))
    for ref in discover_cases(site.data_path):
        assert not any(ref.case_id in n or ref.patient_id in n for n in names)
    assert not any(site.data_path.name in n for n in names)
    assert (site.cache_dir / case_cache.CACHEDIR_TAG).read_text().startswith(
        "Signature: 8a477f597d28d172789f06886806bc55")


def test_an_unwritable_cache_costs_only_speed(tmp_path: Path) -> None:
    site = _site(tmp_path)
    site.state_dir.write_text("a file where the state folder should be")
    spec = ModelSpec(patch_size=(32, 32))
    _new_process()
    decodes = imaging.DECODES
    data = SiteData.load(site, spec)
    files = 2 * (len(data.train) + len(data.val))
    assert imaging.DECODES - decodes == files
    _new_process()
    SiteData.load(site, spec)
    assert imaging.DECODES - decodes == 2 * files


def test_the_preflight_fills_the_cache_the_simulated_sites_read(tmp_path: Path) -> None:
    folders = write_synthetic_federation(tmp_path / "data", num_sites=2, cases_per_site=4,
                                         shape=(32, 32))
    run_dir = tmp_path / "runs" / "sim"
    sites = simulated_sites(folders, run_dir)
    spec = ModelSpec(patch_size=(32, 32))
    preflight(sites, spec)
    for site in sites:
        assert site.cache_dir == run_dir / "site-state" / site.site_name / "cache"
        _new_process()
        decodes, prepared = imaging.DECODES, preprocess.PREPARED
        SiteData.load(site, spec)                   # what a site process does first
        assert (decodes, prepared) == (imaging.DECODES, preprocess.PREPARED)


def test_planning_a_folder_writes_no_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                           ) -> None:
    folder = write_synthetic_federation(tmp_path / "data", num_sites=1, cases_per_site=4,
                                        shape=(32, 32))[0]
    monkeypatch.chdir(tmp_path)                     # where a default state dir would go
    plan_sites([folder])
    assert not (tmp_path / "fedseg-state").exists()
