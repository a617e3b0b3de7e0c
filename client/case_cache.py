"""A site's cache of decoded and prepared cases on its own disk, in ``<state-dir>/cache``.

A Flower SuperNode starts a new ClientApp process for every message, so without
this every round would decode the site's whole data set again. Entries sit below
the per-process cache of :mod:`client.imaging`:

* ``decoded/``: one image file as decoded (the array :func:`client.imaging.read_image`
  returns), whatever model reads it;
* ``cases/``: one case as :func:`client.preprocess.prepared_case` prepares it
  (checked, normalised image, class labels, resampled for training), per model
  input setting (channels, classes, dimensions, normalisation, size).

An entry is one uncompressed ``.npz`` written atomically (temporary file, then
rename), so a reader sees a whole entry or none and concurrent writers are safe.
Its file name is a hash of what names it (the source file's resolved path, plus
the model input settings for a case), so names reveal no case, and a changed
file overwrites its old entry instead of adding one: the cache holds at most one
entry per file (per setting, for cases). Inside, the entry records the source's
identity (resolved path, size, modification and change time in nanoseconds) and a
hash of the code and library versions that made it; anything else on reading,
including a truncated or corrupt file, is a miss, and the entry is made again.
Deleting the folder is always safe.
"""

from __future__ import annotations

import hashlib
import json
import sys
import zipfile
from collections.abc import Mapping, Sequence
from functools import cache
from importlib import metadata
from pathlib import Path

import numpy as np

from shared.atomic import write_atomic

Identity = tuple[str, int, int, int]

#: Marks the folder as a cache for backup tools (``tar --exclude-caches``, borg, restic).
CACHEDIR_TAG = "CACHEDIR.TAG"
_TAG_TEXT = ("Signature: 8a477f597d28d172789f06886806bc55\n"
             "# fedseg's cache of decoded cases: rebuilt from the data folder when deleted.\n")
_KEY = "fedseg-key"
# Everything reading a damaged entry raises: a truncated zip, a bad CRC, a bad .npy header.
_READ_ERRORS: tuple[type[BaseException], ...] = (
    OSError, EOFError, ValueError, KeyError, MemoryError, zipfile.BadZipFile)
_unwritable: set[Path] = set()


def file_identity(path: Path) -> Identity:
    """Return what tells one version of a file from another: real path, size, times.

    The change time (``st_ctime_ns``) is set by the kernel on every write and
    cannot be set back, so a file replaced by a copy with the same size and a
    restored modification time (``cp -p``, ``rsync -t``, a backup) still differs.
    Stat rather than a content hash: hashing would read every file in every round.
    """
    real = Path(path).resolve()
    stat = real.stat()
    return str(real), stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns


@cache
def code_version(*modules: str) -> str:
    """Return a hash of the source of ``modules`` and of the libraries' versions.

    Part of every entry's key: a new fedseg, NumPy, Pillow, nibabel, PyTorch or
    MONAI may read or prepare a file differently, so their entries are made again.
    """
    digest = hashlib.sha256()
    for name in modules:
        digest.update(Path(sys.modules[name].__file__ or name).read_bytes())
    for package in ("numpy", "pillow", "nibabel", "torch", "monai"):
        digest.update(f"{package}={metadata.version(package)}".encode())
    return digest.hexdigest()[:16]


def entry_path(folder: Path, kind: str, name: Sequence[object]) -> Path:
    """Return the file of the entry for ``name``: a hash, so it reveals nothing."""
    digest = hashlib.sha256(json.dumps([kind, *name]).encode()).hexdigest()[:32]
    return folder / kind / f"{digest}.npz"


def _key(kind: str, name: Sequence[object], identity: Sequence[object]) -> np.ndarray:
    text = json.dumps([kind, list(name), list(identity)])
    return np.frombuffer(text.encode(), dtype=np.uint8)


def load(folder: Path, kind: str, name: Sequence[object], identity: Sequence[object],
         arrays: Sequence[str]) -> dict[str, np.ndarray] | None:
    """Return the arrays of the entry for ``name`` if it was made from ``identity``.

    Parameters
    ----------
    folder : pathlib.Path
        The cache folder (``<state-dir>/cache``).
    kind : str
        Sub-folder and part of the key: ``decoded`` or ``cases``.
    name : sequence
        JSON-able values that name the entry (the file name is their hash).
    identity : sequence
        JSON-able values the entry must have been made from (file identities,
        settings, :func:`code_version`).
    arrays : sequence of str
        Names of the arrays to return.

    Returns
    -------
    dict of str to numpy.ndarray or None
        ``None`` for a missing, stale, truncated or otherwise unreadable entry.
    """
    path = entry_path(folder, kind, name)
    try:
        with np.load(path, allow_pickle=False) as entry:
            if not np.array_equal(entry[_KEY], _key(kind, name, identity)):
                return None
            return {key: entry[key] for key in arrays}
    except _READ_ERRORS:
        return None


def store(folder: Path, kind: str, name: Sequence[object], identity: Sequence[object],
          arrays: Mapping[str, np.ndarray]) -> None:
    """Write the entry for ``name`` atomically, replacing any earlier one.

    A folder that cannot be written (read-only, full disk) costs only speed: the
    site goes on decoding, and this process stops trying after the first failure.
    """
    if folder in _unwritable:
        return
    path = entry_path(folder, kind, name)

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as fh:
            np.savez(fh, allow_pickle=False, **arrays, **{_KEY: _key(kind, name, identity)})

    try:
        tag = folder / CACHEDIR_TAG
        if not tag.exists():
            folder.mkdir(parents=True, exist_ok=True)
            tag.write_text(_TAG_TEXT, encoding="utf-8")
        # No fsync: after a crash a torn entry fails its zip or CRC check and is a miss.
        write_atomic(path, write, suffix=".npz", durable=False)
    except OSError:
        _unwritable.add(folder)

