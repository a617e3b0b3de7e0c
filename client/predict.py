"""``fedseg predict``: apply the global model plus the site's own layers to new images."""

from __future__ import annotations

import csv
import io
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from torch import nn

from client.data_contract import load_image_for_inference
from client.imaging import (
    is_image_file,
    mask_name,
    strip_suffix,
    unreadable_link,
    write_map,
    write_mask,
)
from client.inference import (
    Tiling,
    predict_classes,
    predict_with_uncertainty,
    resolve_device,
    trained_flips,
)
from client.personal import FILE_NAME as PERSONAL_FILE
from client.personal import load_personal_model, weights_digest
from client.site_state import FILE_NAME as LOCAL_LAYERS
from client.site_state import load_local_layers
from shared.atomic import write_text_atomic
from shared.checkpoint import Checkpoint
from shared.errors import DataError
from shared.networks import build_network
from shared.partition import local_parameter_names, split_weights
from shared.personalization import PERSONALIZATIONS
from shared.weights import NDArrays, check_compatible, numpy_to_state, state_to_numpy

UNCERTAINTY_SUFFIX = "_uncertainty"
"""Added to a mask's name (before its suffix) to name the case's uncertainty map."""
UNCERTAINTY_CSV = "uncertainty.csv"
"""The per-case uncertainty summary in the output folder, most uncertain case first."""
CSV_COLUMNS = ("image", "mask", "uncertainty_map", "structure_voxels", "mean_uncertainty",
               "mean_over", "max_uncertainty")
"""Columns of :data:`UNCERTAINTY_CSV`."""
OVER_STRUCTURE = "predicted structure"
OVER_WHOLE_IMAGE = "whole image (empty mask)"


@dataclass(frozen=True)
class CaseUncertainty:
    """The uncertainty map written for one case, and its summary.

    Attributes
    ----------
    map : pathlib.Path
        The written map (see :func:`uncertainty_path`).
    structure_voxels : int
        Voxels of the predicted structure (any class other than background).
    mean : float
        Mean uncertainty over those voxels; over the whole image when the mask is
        empty, as an empty mask says nothing about where to look.
    over_structure : bool
        False when ``mean`` is over the whole image because the mask is empty.
    max : float
        Largest uncertainty anywhere in the image.
    """

    map: Path
    structure_voxels: int
    mean: float
    over_structure: bool
    max: float


@dataclass(frozen=True)
class Prediction:
    """One written mask, with its uncertainty map when one was asked for."""

    image: Path
    mask: Path
    uncertainty: CaseUncertainty | None = None


def mask_path(image: Path, output: Path) -> Path:
    """Return where the mask of ``image`` goes: same name, NIfTI stays NIfTI, else PNG."""
    return output / mask_name(image.name)


def uncertainty_path(image: Path, output: Path) -> Path:
    """Return where the uncertainty map of ``image`` goes: the mask's name plus ``_uncertainty``.

    ``a.jpg`` gives ``a_uncertainty.png`` and ``b.nii.gz`` gives
    ``b_uncertainty.nii.gz``: the map has its mask's format and geometry.
    """
    mask = mask_name(image.name)
    stem = strip_suffix(mask)
    return output / f"{stem}{UNCERTAINTY_SUFFIX}{mask[len(stem):]}"


def summarise_uncertainty(classes: np.ndarray, uncertainty: np.ndarray,
                          map_file: Path) -> CaseUncertainty:
    """Return the per-case summary of an uncertainty map and the mask predicted with it."""
    structure = classes > 0
    voxels = int(np.count_nonzero(structure))
    inside = uncertainty[structure] if voxels else uncertainty
    return CaseUncertainty(map=map_file, structure_voxels=voxels, mean=float(inside.mean()),
                           over_structure=bool(voxels), max=float(uncertainty.max()))


def uncertainty_table(predictions: list[Prediction]) -> str:
    """Return :data:`UNCERTAINTY_CSV`'s text: one row per case, most uncertain first.

    Mask and map are named by file name (they sit beside the table); images by
    the path they were read from.
    """
    cases = [(p, p.uncertainty) for p in predictions if p.uncertainty is not None]
    cases.sort(key=lambda item: (-item[1].mean, item[0].image.name))
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for prediction, case in cases:
        writer.writerow([str(prediction.image), prediction.mask.name, case.map.name,
                         case.structure_voxels, f"{case.mean:.6f}",
                         OVER_STRUCTURE if case.over_structure else OVER_WHOLE_IMAGE,
                         f"{case.max:.6f}"])
    return buffer.getvalue()


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


def _outputs(image: Path, output_dir: Path, uncertainty: bool) -> list[tuple[str, Path]]:
    outputs = [("mask", mask_path(image, output_dir))]
    if uncertainty:
        outputs.append(("uncertainty map", uncertainty_path(image, output_dir)))
    return outputs


def check_mask_names(images: list[Path], output_dir: Path, uncertainty: bool = False) -> None:
    """Refuse two images whose outputs would share a file, or an output that is an image.

    ``a.png``, ``a.jpg`` and ``a.PNG`` all give ``a.png``; names are compared
    without case, as on macOS and Windows file systems. An input image linked
    from the output folder would be overwritten by its own mask. With
    ``uncertainty`` the maps and :data:`UNCERTAINTY_CSV` are checked too: the
    map of ``a.png`` is ``a_uncertainty.png``, the mask of an input image of
    that name.

    Raises
    ------
    DataError
        Naming both images and the shared file, or the output and the image.

    """
    sources = {image.resolve(): image for image in images}
    fix_link = "pass an --output folder that holds none of the input images"
    table = output_dir / UNCERTAINTY_CSV
    if uncertainty and table.resolve() in sources:
        raise DataError(table, f"is the input image {sources[table.resolve()]} (through a "
                        "link), so the uncertainty summary would replace it", fix_link)
    seen: dict[str, tuple[Path, str]] = {}
    for image in images:
        for kind, target in _outputs(image, output_dir, uncertainty):
            if target.resolve() in sources:
                raise DataError(
                    target,
                    f"is the input image {sources[target.resolve()]} (through a link), so its "
                    f"{kind} would replace it",
                    fix_link,
                )
            key = target.name.casefold()
            if key not in seen:
                seen[key] = (image, kind)
                continue
            other, other_kind = seen[key]
            if kind == other_kind == "mask":
                raise DataError(
                    image,
                    f"would get the same mask file {target.name} as "
                    f"{other.name}",
                    "rename one of them so that their names differ without the suffix",
                )
            raise DataError(
                image,
                f"would get the file {target.name} as its {kind}, which is also the "
                f"{other_kind} of {other.name}",
                f"rename one of them: a map is named like its mask with "
                f"'{UNCERTAINTY_SUFFIX}' added",
            )


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
    personal : bool
        The whole network is the site's personal model (personalization ditto or
        finetune), read from its state folder.
    """

    net: nn.Module
    checkpoint: Checkpoint
    local_names: frozenset[str]
    personal: bool = False


def load_site_network(model: Path, site_state: Path | None) -> SiteNetwork:
    """Build the network of ``model`` with the site's own layers from ``site_state``.

    With personalisation (``ditto``, ``finetune``) the site deploys its personal
    model from ``site_state`` instead: the whole network, its own layers included.

    Raises
    ------
    DataError
        The checkpoint is unreadable, does not fit its own model settings or holds
        NaN/infinite weights, or the model has site-local layers or personal models
        and ``site_state`` is missing or holds none that fit and are finite (a
        fine-tune must be of this checkpoint's weights). ``site_state`` is ignored
        for a model without either.
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
    if PERSONALIZATIONS[spec.personalization].personal_model:
        _load_personal(net, model, checkpoint, site_state)
        return SiteNetwork(net, checkpoint, local_names, personal=True)
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


def _load_personal(net: nn.Module, model: Path, checkpoint: Checkpoint,
                   site_state: Path | None) -> None:
    """Load the site's personal model for ``checkpoint`` into ``net``, or refuse."""
    spec = checkpoint.spec
    if site_state is None:
        raise DataError(model, f"was trained with personalization '{spec.personalization}'",
                        "pass --site-state with this site's state folder")
    expected = {k: tuple(v.shape) for k, v in state_to_numpy(net.state_dict()).items()}
    personal = load_personal_model(site_state, spec, expected)
    if personal is None:
        raise DataError(site_state, "holds no personal model for this model",
                        "pass the state folder this site trained with")
    if PERSONALIZATIONS[spec.personalization].finetunes and \
            personal.base != weights_digest(checkpoint.weights):
        raise DataError(site_state, f"holds a fine-tune of another global model (round "
                        f"{personal.server_round}), not of {model.name}",
                        f"pass checkpoints/round-{personal.server_round:03d}.pt of the run as "
                        "--model")
    check_finite(personal.weights, site_state / PERSONAL_FILE)
    net.load_state_dict(numpy_to_state(personal.weights), strict=False)


@contextmanager
def _writing(path: Path) -> Iterator[None]:
    try:
        yield
    except OSError as exc:
        raise DataError(path, f"cannot be written ({exc.strerror})",
                        "free disk space or pass a folder you can write to") from None


def predict_folder(model: Path, input_dir: Path, output_dir: Path,
                   site_state: Path | None = None, device: str = "auto",
                   uncertainty: bool = False) -> list[Prediction]:
    """Segment every image in ``input_dir`` and write masks into ``output_dir``.

    NIfTI masks keep the input's affine and header; 2D images give PNG masks.
    Every check (input, output folder, output names, model) runs before anything
    is written, so a refused call leaves the disk as it was.

    With ``uncertainty`` each image is predicted by test-time augmentation over
    the flips its model was trained on (:func:`~client.inference.predict_with_uncertainty`,
    :func:`~client.inference.trained_flips`): its mask is the flip-averaged
    prediction, an uncertainty map in the mask's format and
    geometry goes beside it (:func:`uncertainty_path`), and
    :data:`UNCERTAINTY_CSV` lists the cases, most uncertain first.

    Raises
    ------
    DataError
        Any of those checks fails, an image cannot be read, or a mask cannot be
        written.

    """
    images = list_images(input_dir)
    check_output_folder(input_dir, output_dir)
    check_mask_names(images, output_dir, uncertainty)
    site_net = load_site_network(model, site_state)
    net, spec = site_net.net, site_net.checkpoint.spec
    torch_device = resolve_device(device)
    net.to(torch_device)
    tiling = Tiling.of(spec)
    # Uncertainty averages only flips the model was trained on, even when
    # test-time-flips is off: a mirrored chest is not a plausible input.
    uncertain = replace(tiling, flips=trained_flips(spec))
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DataError(output_dir, f"cannot be created ({exc.strerror})",
                        "pass a folder you can write to") from None
    written = []
    for image in images:
        array, source = load_image_for_inference(image, spec.in_channels, spec.spatial_dims,
                                                 spec.normalization)
        out = mask_path(image, output_dir)
        summary = None
        if uncertainty:
            result = predict_with_uncertainty(net, array, uncertain, torch_device)
            mask = result.classes
            map_out = uncertainty_path(image, output_dir)
            with _writing(map_out):
                write_map(result.uncertainty, source, map_out)
            summary = summarise_uncertainty(mask, result.uncertainty, map_out)
        else:
            mask = predict_classes(net, array, tiling, torch_device)
        with _writing(out):
            write_mask(mask, source, out, num_classes=spec.num_classes)
        written.append(Prediction(image, out, summary))
    if uncertainty:
        table = output_dir / UNCERTAINTY_CSV
        with _writing(table):
            write_text_atomic(table, uncertainty_table(written))
    return written
