"""``fedseg predict``: apply the global model plus the site's own layers to new images."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from torch import nn

from client.data_contract import load_image_for_inference
from client.imaging import (
    is_image_file,
    mask_name,
    strip_suffix,
    unreadable_link,
    write_mask,
)
from client.inference import predict_classes
from client.site_state import FILE_NAME as LOCAL_LAYERS
from client.site_state import load_local_layers
from client.trainer import resolve_device
from shared.checkpoint import Checkpoint
from shared.errors import DataError
from shared.networks import build_network
from shared.partition import local_parameter_names, split_weights
from shared.weights import NDArrays, check_compatible, numpy_to_state, state_to_numpy


@dataclass(frozen=True)
class Prediction:
    """One written mask."""

    image: Path
    mask: Path


def mask_path(image: Path, output: Path) -> Path:
    """Return where the mask of ``image`` goes: same name, NIfTI stays NIfTI, else PNG."""
    return output / mask_name(image.name)


def _nearest_existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_output_folder(input_dir: Path, output_dir: Path) -> None:
    """Refuse an output folder that would overwrite images or cannot take masks.

    Masks are written only into the top level of ``output_dir``, so it must not be
    ``input_dir`` or inside it: masks would replace images of the same name, or
    turn up as images in the next run. An input folder inside the output folder
    is allowed, as nothing is written below the output's top level.

    Raises
    ------
    DataError
        ``output_dir`` is (inside) ``input_dir`` after resolving links, is a file,
        lies below a file, or cannot be created or written.

    """
    fix_place = "pass an --output folder outside the --input folder"
    source = input_dir.resolve()
    target = output_dir.resolve()
    if target == source:
        raise DataError(output_dir, "is the input folder: the masks would replace the images",
                        fix_place)
    if target.is_relative_to(source):
        raise DataError(output_dir, f"lies inside the input folder {input_dir}", fix_place)
    existing = _nearest_existing(output_dir)
    if existing == output_dir and not output_dir.is_dir():
        raise DataError(output_dir, "is a file, not a folder",
                        "pass a folder for the masks (it is created if missing)")
    if not existing.is_dir():
        raise DataError(output_dir, f"cannot be created: {existing} is a file",
                        "pass a folder path whose parents are folders")
    if not os.access(existing, os.W_OK | os.X_OK):
        what = "cannot be written" if existing == output_dir else \
            f"cannot be created: no write permission in {existing}"
        raise DataError(output_dir, what, "pass a folder you can write to")


def check_mask_names(images: list[Path], output_dir: Path) -> None:
    """Refuse two images whose masks would share a file, or a mask that is an image.

    ``a.png``, ``a.jpg`` and ``a.PNG`` all give ``a.png``; names are compared
    without case, as on macOS and Windows file systems. An input image linked
    from the output folder would be overwritten by its own mask.

    Raises
    ------
    DataError
        Naming both images and the shared mask, or the mask and the image.

    """
    sources = {image.resolve(): image for image in images}
    seen: dict[str, Path] = {}
    for image in images:
        target = mask_path(image, output_dir)
        if target.resolve() in sources:
            raise DataError(
                target,
                f"is the input image {sources[target.resolve()]} (through a link), so its "
                "mask would replace it",
                "pass an --output folder that holds none of the input images",
            )
        key = target.name.casefold()
        if key in seen:
            raise DataError(
                image,
                f"would get the same mask file {target.name} as "
                f"{seen[key].name}",
                "rename one of them so that their names differ without the suffix",
            )
        seen[key] = image


def check_finite(weights: NDArrays, source: Path) -> None:
    """Refuse weights with NaN or infinite values, naming the first such parameter.

    A diverged model predicts one class everywhere, so its masks would look like
    plausible, empty output.
    """
    for name, array in weights.items():
        bad = int(np.count_nonzero(~np.isfinite(array)))
        if bad:
            raise DataError(
                source,
                f"parameter '{name}' holds {bad} NaN or infinite value(s); the model diverged",
                "use a checkpoint from an earlier round (checkpoints/ in the run folder) or "
                "train again with a lower learning-rate",
            )


def list_images(input_dir: Path) -> list[Path]:
    """Return the images of ``input_dir``, refusing links that cannot be followed."""
    if not input_dir.is_dir():
        raise DataError(input_dir, "input folder not found", "pass a folder of images")
    images = []
    for path in sorted(input_dir.iterdir()):
        link = unreadable_link(path) if strip_suffix(path.name) != path.name else ""
        if link and not path.name.startswith("."):
            raise DataError(path, link, "point the link at the real image or remove it")
        if is_image_file(path):
            images.append(path)
    if not images:
        raise DataError(input_dir, "holds no .nii.gz, .nii, .png or .jpg images",
                        "pass a folder of images")
    return images


@dataclass(frozen=True)
class SiteNetwork:
    """The network a site applies: global shared weights plus the site's own layers.

    Attributes
    ----------
    net : torch.nn.Module
        The assembled network on the CPU.
    checkpoint : Checkpoint
        The global model it was built from.
    local_names : frozenset of str
        Names of the site-local parameters (empty without adaptation); when not
        empty they hold the site's layers read from its state folder.
    """

    net: nn.Module
    checkpoint: Checkpoint
    local_names: frozenset[str]


def load_site_network(model: Path, site_state: Path | None) -> SiteNetwork:
    """Build the network of ``model`` with the site's own layers from ``site_state``.

    Raises
    ------
    DataError
        The checkpoint is unreadable, does not fit its own model settings or holds
        NaN/infinite weights, or the model has site-local layers and ``site_state``
        is missing or holds none that fit and are finite. ``site_state`` is ignored
        for a model without local layers.
    """
    checkpoint = Checkpoint.load(model)
    spec = checkpoint.spec
    net = build_network(spec)
    local_names = local_parameter_names(net, spec.adaptation)
    shared_state, local_state = split_weights(net.state_dict(), local_names)
    try:
        check_compatible(shared_state, checkpoint.weights, f"model {model}")
    except ValueError as exc:
        raise DataError(model, str(exc).removeprefix(f"model {model}").lstrip(": ")) from None
    check_finite(checkpoint.weights, model)
    net.load_state_dict(numpy_to_state(checkpoint.weights), strict=False)
    if local_names:
        if site_state is None:
            raise DataError(model, f"was trained with adaptation '{spec.adaptation}'",
                            "pass --site-state with this site's state folder")
        local = load_local_layers(site_state, spec.adaptation,
                                  {k: tuple(v.shape) for k, v in
                                   state_to_numpy(local_state).items()})
        if local is None:
            raise DataError(site_state, "holds no local layers for this model",
                            "pass the state folder this site trained with")
        check_finite(local, site_state / LOCAL_LAYERS)
        net.load_state_dict(numpy_to_state(local), strict=False)
    return SiteNetwork(net, checkpoint, local_names)


def predict_folder(model: Path, input_dir: Path, output_dir: Path,
                   site_state: Path | None = None, device: str = "auto") -> list[Prediction]:
    """Segment every image in ``input_dir`` and write masks into ``output_dir``.

    NIfTI masks keep the input's affine and header; 2D images give PNG masks.
    Every check (input, output folder, mask names, model) runs before anything is
    written, so a refused call leaves the disk as it was.

    Raises
    ------
    DataError
        Any of those checks fails, an image cannot be read, or a mask cannot be
        written.

    """
    images = list_images(input_dir)
    check_output_folder(input_dir, output_dir)
    check_mask_names(images, output_dir)
    site_net = load_site_network(model, site_state)
    net, spec = site_net.net, site_net.checkpoint.spec
    torch_device = resolve_device(device)
    net.to(torch_device)
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DataError(output_dir, f"cannot be created ({exc.strerror})",
                        "pass a folder you can write to") from None
    written = []
    for image in images:
        array, source = load_image_for_inference(image, spec.in_channels, spec.spatial_dims,
                                                 spec.normalization)
        mask = predict_classes(net, array, spec.patch_size, torch_device, spec.resize)
        out = mask_path(image, output_dir)
        try:
            write_mask(mask, source, out, num_classes=spec.num_classes)
        except OSError as exc:
            raise DataError(out, f"cannot be written ({exc.strerror})",
                            "free disk space or pass a folder you can write to") from None
        written.append(Prediction(image, out))
    return written
