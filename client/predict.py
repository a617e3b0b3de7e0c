"""``fedseg predict``: apply the global model plus the site's own layers to new images."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from client.data_contract import load_image_for_inference
from client.imaging import SUFFIX_LIST, is_image_file, mask_name, write_mask
from client.inference import predict_classes
from client.site_state import load_local_layers
from client.trainer import resolve_device
from shared.checkpoint import Checkpoint
from shared.errors import DataError
from shared.networks import build_network
from shared.partition import local_parameter_names, split_weights
from shared.weights import check_compatible, numpy_to_state, state_to_numpy


@dataclass(frozen=True)
class Prediction:
    """One written mask."""

    image: Path
    mask: Path


def mask_path(image: Path, output: Path) -> Path:
    """Return where the mask of ``image`` goes: same name, NIfTI stays NIfTI, else PNG."""
    return output / mask_name(image.name)


def predict_folder(model: Path, input_dir: Path, output_dir: Path,
                   site_state: Path | None = None, device: str = "auto") -> list[Prediction]:
    """Segment every image in ``input_dir`` and write masks into ``output_dir``.

    NIfTI masks keep the input's affine and header; 2D images give PNG masks.
    """
    checkpoint = Checkpoint.load(model)
    spec = checkpoint.spec
    net = build_network(spec)
    local_names = local_parameter_names(net, spec.adaptation)
    shared_state, local_state = split_weights(net.state_dict(), local_names)
    check_compatible(shared_state, checkpoint.weights, f"model {model}")
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
        net.load_state_dict(numpy_to_state(local), strict=False)
    if not input_dir.is_dir():
        raise DataError(input_dir, "input folder not found", "pass a folder of images")
    images = sorted(p for p in input_dir.iterdir() if is_image_file(p))
    if not images:
        raise DataError(input_dir, f"holds no images ({SUFFIX_LIST})",
                        "pass a folder of images")
    torch_device = resolve_device(device)
    net.to(torch_device)
    written = []
    for image in images:
        array, source = load_image_for_inference(image, spec.in_channels, spec.spatial_dims)
        mask = predict_classes(net, array, spec.patch_size, torch_device)
        out = mask_path(image, output_dir)
        write_mask(mask, source, out, num_classes=spec.num_classes)
        written.append(Prediction(image, out))
    return written
