"""``fedseg export``: a site's network as one self-contained TorchScript or ONNX file.

The network is assembled exactly as ``fedseg predict`` assembles it (global shared
weights plus the site's own layers, :func:`client.predict.load_site_network`), put
in eval mode, exported, and then run once through the target runtime and compared
with PyTorch before the command reports success. Beside the model goes
``<output>.json``, the input contract a deployment needs to feed the model exactly
as fedseg does (channels, patch size, normalisation, what the output means).

ONNX uses PyTorch's ``torch.export``-based exporter (it needs ``onnxscript``) at
opset :data:`ONNX_OPSET`, with the batch axis and every spatial axis dynamic, and
with the weights inside the file (so a model must stay under ONNX's 2 GB limit,
far above fedseg's networks).
"""

from __future__ import annotations

import json
import logging
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from client.inference import BLEND_MODE, Tiling
from client.predict import SiteNetwork, load_site_network
from shared.atomic import file_sha256, write_atomic, write_text_atomic
from shared.config import ModelSpec
from shared.errors import DataError, FedsegError
from shared.normalization import NORMALIZATIONS

FORMATS = ("torchscript", "onnx")
CONTRACT_FORMAT = "fedseg-export/1"
# Opset 18 is the lowest the torch.export-based exporter targets natively (lower ones
# go through a version converter) and every ONNX Runtime since 1.14 runs it.
ONNX_OPSET = 18
INPUT_NAME = "image"
OUTPUT_NAME = "logits"
# The acceptance bound of issue 14: exported logits within this of PyTorch's.
TOLERANCE = 1e-4

RESIZE = ("resample the normalised image to this size by area averaging before the network, "
          "and the logits back to the image's own size (bilinear or trilinear, "
          "align_corners=False) before the argmax")
DOWNSAMPLE = ("resample the normalised image to ceil(side / factor) per axis by area "
              "averaging before the network, and the logits back to the image's own size "
              "(bilinear or trilinear, align_corners=False) before the argmax")
CHANNEL_MATCHING = (
    "images with in_channels channels are used as they are; a 1-channel image is repeated "
    "to in_channels; RGB/RGBA is averaged over R, G, B for a 1-channel model; RGBA drops "
    "alpha for a 3-channel model"
)
OUTPUT = (
    "float32 logits over num_classes classes, shape (N, num_classes, *spatial) for an "
    "input (N, in_channels, *spatial); argmax over axis 1 gives the mask (0 = background)"
)


@dataclass(frozen=True)
class ExportRequest:
    """What ``fedseg export`` was asked to do.

    Attributes
    ----------
    model : Path
        ``final_model.pt`` of a run.
    output : Path
        The file to write; the contract goes to ``<output>.json``.
    fmt : str
        ``torchscript`` or ``onnx``.
    site_state : Path or None
        The site's state folder, whose local layers are folded in.
    force : bool
        Replace an existing output and contract.
    """

    model: Path
    output: Path
    fmt: str
    site_state: Path | None = None
    force: bool = False


@dataclass(frozen=True)
class ExportResult:
    """What ``fedseg export`` wrote."""

    model: Path
    contract_path: Path
    contract: dict[str, Any]
    max_abs_diff: float


def contract_path(output: Path) -> Path:
    """Return where the input contract of ``output`` goes: ``<output>.json``."""
    return output.with_name(output.name + ".json")


def export_model(request: ExportRequest) -> ExportResult:
    """Export the site's network and write its contract; see the module docstring.

    Raises
    ------
    FedsegError
        Unknown format, unusable output path, unreadable or non-finite model or site
        layers, ``site_state`` given for a model without local layers, or an
        exported model that does not reproduce PyTorch within :data:`TOLERANCE`.
    """
    if request.fmt not in FORMATS:
        raise FedsegError(f"--format: unknown format '{request.fmt}'; use "
                          f"{' or '.join(FORMATS)}")
    _check_output(request)
    site_net = load_site_network(request.model, request.site_state)
    spec = site_net.checkpoint.spec
    if request.site_state is not None and not site_net.local_names and not site_net.personal:
        raise DataError(request.site_state, f"model {request.model} has no site-local layers "
                        f"(adaptation '{spec.adaptation}')", "leave out --site-state")
    net = site_net.net.eval()
    # Batch 2 and the full patch: the shape predict's sliding window feeds, and a batch
    # above 1 so that the ONNX exporter cannot specialise the batch axis to 1.
    generator = torch.Generator().manual_seed(0)
    example = torch.randn(2, spec.in_channels, *spec.patch_size, generator=generator)
    with torch.no_grad():
        expected = net(example).numpy()

    if request.fmt == "torchscript":
        write_atomic(request.output, lambda tmp: _save_torchscript(net, tmp),
                     suffix=".pt")
        actual = _run_torchscript(request.output, example)
    else:
        write_atomic(request.output, lambda tmp: _save_onnx(net, example, spec, tmp),
                     suffix=".onnx")
        actual = run_onnx(request.output, example.numpy())
    diff = float(np.max(np.abs(actual - expected)))
    if not diff <= TOLERANCE:
        request.output.unlink()
        raise FedsegError(f"{request.output}: the exported model's logits differ from "
                          f"PyTorch's by {diff:.2e} (> {TOLERANCE:g}), so it was removed; "
                          "report this with the model's settings")

    contract = _contract(request, site_net, diff)
    sidecar = contract_path(request.output)
    write_text_atomic(sidecar, json.dumps(contract, indent=2) + "\n")
    return ExportResult(request.output, sidecar, contract, diff)


def _check_output(request: ExportRequest) -> None:
    output = request.output
    fix = "choose another --output"
    if output.is_dir():
        raise DataError(output, "is a folder", "give a file name, e.g. --output "
                        f"{output / ('model.onnx' if request.fmt == 'onnx' else 'model.pt')}")
    if not output.parent.is_dir():
        raise DataError(output.parent, "folder not found", f"create it first or {fix}")
    if output.exists() and request.model.exists() and output.samefile(request.model):
        raise DataError(output, "is the --model checkpoint itself", fix)
    sidecar = contract_path(output)
    if sidecar.is_dir():
        raise DataError(sidecar, "is a folder (the contract JSON goes there)", fix)
    for path in (output, sidecar):
        if path.exists() and not request.force:
            raise DataError(path, "already exists", f"pass --force to replace it or {fix}")


@contextmanager
def _quiet_exporters() -> Iterator[None]:
    """Silence exporter chatter that says nothing about this model.

    torch's ONNX registry logs one warning per torchvision operator when torchvision
    is absent, and PyTorch (TorchScript itself is deprecated) and onnxscript emit
    deprecation warnings of their own.
    """
    registry = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = registry.level
    registry.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            warnings.simplefilter("ignore", FutureWarning)
            yield
    finally:
        registry.setLevel(level)


def _save_torchscript(net: nn.Module, path: Path) -> None:
    # Scripting, not tracing: it keeps the Python branches on input shape (BasicUNet
    # pads odd-sized skip connections) that a trace would freeze at the example's size.
    # Every fedseg network scripts; the check against PyTorch runs on the saved file.
    with _quiet_exporters():
        torch.jit.save(torch.jit.script(net), str(path))


def _run_torchscript(path: Path, x: torch.Tensor) -> np.ndarray:
    with _quiet_exporters():
        loaded = torch.jit.load(str(path), map_location="cpu")
    with torch.no_grad():
        out = loaded(x)
    assert isinstance(out, torch.Tensor)
    return out.numpy()


def _spatial_axis_names(spatial_dims: int) -> tuple[str, ...]:
    return ("height", "width") if spatial_dims == 2 else ("x", "y", "z")


def _save_onnx(net: nn.Module, example: torch.Tensor, spec: ModelSpec, path: Path) -> None:
    axes = {0: "batch"}
    axes.update({2 + i: name for i, name in enumerate(_spatial_axis_names(spec.spatial_dims))})
    with _quiet_exporters():
        torch.onnx.export(
            net, (example,), str(path), dynamo=True, verbose=False, opset_version=ONNX_OPSET,
            input_names=[INPUT_NAME], output_names=[OUTPUT_NAME], dynamic_shapes=(axes,),
            external_data=False,
        )
    import onnx

    try:
        onnx.checker.check_model(str(path), full_check=True)
    except onnx.checker.ValidationError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise FedsegError(f"{path}: the exported ONNX model is invalid ({first}); report "
                          "this with the model's settings") from None


def run_onnx(path: Path, x: np.ndarray) -> np.ndarray:
    """Run an exported ONNX model on ``x`` with ONNX Runtime's CPU provider."""
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (out,) = session.run([OUTPUT_NAME], {INPUT_NAME: np.ascontiguousarray(x, np.float32)})
    return np.asarray(out)


#: How ``fedseg predict`` combines the passes listed in ``test_time_flips``.
TEST_TIME_FLIPS = (
    "for each entry, flip the image along those spatial axes (0 is the first spatial axis; "
    "[] is the image as it is), predict it with the sliding window, take the softmax over "
    "the classes and flip it back; the mask is the argmax of the mean of those probabilities "
    "(one entry [] only: the argmax of the logits)")


def sliding_window(spec: ModelSpec) -> dict[str, Any]:
    """Return how ``fedseg predict`` tiles an image for ``spec`` (:class:`Tiling`), for MONAI.

    The values are the arguments of ``monai.inferers.sliding_window_inference``:
    ``roi_size``, ``overlap``, ``mode`` and ``windows_per_batch`` (its ``sw_batch_size``,
    which changes speed and memory only).
    """
    tiling = Tiling.of(spec)
    return {"roi_size": list(tiling.patch_size), "overlap": tiling.overlap, "mode": BLEND_MODE,
            "windows_per_batch": tiling.windows_per_batch}


def _contract(request: ExportRequest, site_net: SiteNetwork, diff: float) -> dict[str, Any]:
    spec = site_net.checkpoint.spec
    spatial = _spatial_axis_names(spec.spatial_dims)
    runtime: dict[str, Any]
    if request.fmt == "onnx":
        runtime = {"opset": ONNX_OPSET, "input_name": INPUT_NAME, "output_name": OUTPUT_NAME,
                   "dynamic_axes": ["batch", *spatial]}
    else:
        runtime = {"exported_with_torch": torch.__version__.split("+")[0],
                   "load": "torch.jit.load(path)"}
    return {
        "format": CONTRACT_FORMAT,
        "model_file": request.output.name,
        "model_format": request.fmt,
        "sha256": file_sha256(request.output),
        "runtime": runtime,
        "spatial_dims": spec.spatial_dims,
        "in_channels": spec.in_channels,
        "num_classes": spec.num_classes,
        "patch_size": list(spec.patch_size),
        "input_layout": "NC" + ("HW" if spec.spatial_dims == 2 else "XYZ"),
        "input_dtype": "float32",
        "spatial_multiple_of": spec.downsampling_factor,
        "normalization": NORMALIZATIONS[spec.normalization].description,
        "normalization_scheme": spec.normalization,
        "resize": list(spec.resize) if spec.resize else None,
        "resize_how": RESIZE if spec.resize else None,
        "downsample": list(spec.downsample) if spec.downsample else None,
        "downsample_how": DOWNSAMPLE if spec.downsample else None,
        "channel_matching": CHANNEL_MATCHING,
        "output": OUTPUT,
        "sliding_window": sliding_window(spec),
        "test_time_flips": [list(axes) for axes in Tiling.of(spec).flips],
        "test_time_flips_how": TEST_TIME_FLIPS,
        "network": {"architecture": spec.network, "norm": spec.norm,
                    "channels": list(spec.channels)},
        "adaptation": spec.adaptation,
        "personalization": spec.personalization,
        "site_layers_folded_in": bool(site_net.local_names) or site_net.personal,
        "source_checkpoint": {"file": request.model.name, "round": site_net.checkpoint.server_round,
                              "sha256": file_sha256(request.model)},
        "max_abs_diff_vs_pytorch": diff,
    }
