"""``fedseg export``: TorchScript and ONNX files that reproduce PyTorch, and bad input."""

from __future__ import annotations

import hashlib
import json
import warnings
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from monai.inferers import sliding_window_inference
from PIL import Image
from torch import nn

from client.inference import Tiling, predict_logits
from client.site_state import FILE_NAME as LOCAL_LAYERS_FILE
from client.site_state import save_local_layers
from fedseg.cli import EXIT_BAD_INPUT, main
from fedseg.export import TOLERANCE, run_onnx, sliding_window
from shared.checkpoint import Checkpoint
from shared.config import ModelSpec
from shared.networks import build_network
from shared.partition import local_parameter_names, split_weights
from shared.weights import numpy_to_state, state_to_numpy

SPEC_2D = ModelSpec(channels=(4, 8, 16), patch_size=(32, 32), in_channels=3)
SPEC_3D = ModelSpec(channels=(4, 8), patch_size=(16, 16, 16))


def global_model(tmp_path: Path, spec: ModelSpec, seed: int = 0) -> tuple[Path, nn.Module]:
    """Save a freshly initialised network as a run's final model; return it too."""
    torch.manual_seed(seed)
    net = build_network(spec).eval()
    path = tmp_path / "final_model.pt"
    Checkpoint(spec, state_to_numpy(net.state_dict()), 7).save(path)
    return path, net


def site_model(tmp_path: Path, spec: ModelSpec) -> tuple[Path, Path, nn.Module, nn.Module]:
    """Return (checkpoint, state folder, site network, global network with fresh local layers).

    The site's layers are moved well away from their initial values, so a model
    without them gives visibly different logits.
    """
    torch.manual_seed(1)
    site_net = build_network(spec).eval()
    local_names = local_parameter_names(site_net, spec.adaptation)
    assert local_names
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, param in site_net.named_parameters():
            if name in local_names:
                param.add_(0.5 * torch.randn(param.shape, generator=generator))
    shared, local = split_weights(state_to_numpy(site_net.state_dict()), local_names)
    model = tmp_path / "final_model.pt"
    Checkpoint(spec, shared, 9).save(model)
    state = tmp_path / "state"
    save_local_layers(state, spec.adaptation, local)
    global_only = build_network(spec).eval()
    global_only.load_state_dict(numpy_to_state(shared), strict=False)
    return model, state, site_net, global_only


def export(model: Path, fmt: str, output: Path, *extra: str) -> int:
    return main(["export", "--model", str(model), "--format", fmt, "--output", str(output),
                 *extra])


def run_exported(path: Path, fmt: str, x: torch.Tensor) -> np.ndarray:
    if fmt == "onnx":
        onnx.checker.check_model(str(path))
        return run_onnx(path, x.numpy())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # TorchScript is deprecated
        loaded = torch.jit.load(str(path))
    with torch.no_grad():
        return np.asarray(loaded(x).numpy())


def logits(net: nn.Module, x: torch.Tensor) -> np.ndarray:
    with torch.no_grad():
        return np.asarray(net(x).numpy())


@pytest.mark.parametrize("fmt", ["torchscript", "onnx"])
@pytest.mark.parametrize("spec", [SPEC_2D, SPEC_3D], ids=["2d", "3d"])
def test_export_reproduces_pytorch(tmp_path: Path, spec: ModelSpec, fmt: str) -> None:
    model, net = global_model(tmp_path, spec)
    out = tmp_path / f"model.{fmt}"
    assert export(model, fmt, out) == 0
    # Another batch size and twice the patch: the batch and spatial axes are dynamic.
    x = torch.randn(3, spec.in_channels, *(2 * p for p in spec.patch_size),
                    generator=torch.Generator().manual_seed(3))
    expected = logits(net, x)
    actual = run_exported(out, fmt, x)
    assert actual.shape == (3, spec.num_classes, *x.shape[2:])
    assert float(expected.std()) > 1e-3  # a real comparison, not of two constant maps
    assert float(np.max(np.abs(actual - expected))) <= TOLERANCE

    contract = json.loads((tmp_path / f"model.{fmt}.json").read_text())
    assert contract["format"] == "fedseg-export/1" and contract["model_format"] == fmt
    assert contract["sha256"] == hashlib.sha256(out.read_bytes()).hexdigest()
    assert contract["spatial_dims"] == spec.spatial_dims
    assert contract["in_channels"] == spec.in_channels
    assert contract["num_classes"] == spec.num_classes
    assert contract["patch_size"] == list(spec.patch_size)
    assert "z-score" in contract["normalization"]
    assert "argmax" in contract["output"]
    assert contract["adaptation"] == "none" and contract["site_layers_folded_in"] is False
    assert contract["source_checkpoint"]["round"] == 7
    assert contract["max_abs_diff_vs_pytorch"] <= TOLERANCE


@pytest.mark.parametrize(("adaptation", "fmt", "spec"), [
    ("local-norm", "onnx", SPEC_3D),
    ("adapter", "torchscript", SPEC_2D),
], ids=["local-norm-onnx-3d", "adapter-torchscript-2d"])
def test_site_layers_are_folded_in(tmp_path: Path, adaptation: str, fmt: str,
                                   spec: ModelSpec) -> None:
    spec = ModelSpec(channels=spec.channels, patch_size=spec.patch_size,
                     in_channels=spec.in_channels, adaptation=adaptation)
    model, state, site_net, global_only = site_model(tmp_path, spec)
    out = tmp_path / f"site.{fmt}"
    assert export(model, fmt, out, "--site-state", str(state)) == 0
    x = torch.randn(2, spec.in_channels, *spec.patch_size,
                    generator=torch.Generator().manual_seed(4))
    actual = run_exported(out, fmt, x)
    assert float(np.max(np.abs(actual - logits(site_net, x)))) <= TOLERANCE
    assert float(np.max(np.abs(actual - logits(global_only, x)))) > 100 * TOLERANCE
    contract = json.loads(Path(f"{out}.json").read_text())
    assert contract["adaptation"] == adaptation and contract["site_layers_folded_in"] is True
    assert contract["source_checkpoint"]["round"] == 9


def test_contract_is_enough_to_reproduce_fedseg_predict(tmp_path: Path) -> None:
    """Following the JSON's normalisation by hand gives predict's mask from the ONNX file."""
    model, _ = global_model(tmp_path, SPEC_2D)
    images = tmp_path / "in"
    images.mkdir()
    rgb = np.random.default_rng(5).integers(0, 255, (32, 32, 3), dtype=np.uint8)
    rgb[:16] //= 3  # a darker half, so the mask is not uniform
    Image.fromarray(rgb).save(images / "a.png")
    assert main(["predict", "--model", str(model), "--input", str(images),
                 "--output", str(tmp_path / "masks"), "--device", "cpu"]) == 0
    predicted = np.asarray(Image.open(tmp_path / "masks" / "a.png")) > 0
    assert export(model, "onnx", tmp_path / "m.onnx") == 0

    contract = json.loads((tmp_path / "m.onnx.json").read_text())
    assert "per-channel z-score over the whole image" in contract["normalization"]
    # The image is exactly one patch, so predict's sliding window is one plain forward.
    assert rgb.shape[:2] == tuple(contract["patch_size"])
    x = np.moveaxis(rgb, -1, 0).astype(np.float64)
    x = (x - x.mean(axis=(1, 2), keepdims=True)) / x.std(axis=(1, 2), keepdims=True)
    assert contract["test_time_flips"] == [[], [0], [1], [0, 1]]
    mean = 0
    for axes in contract["test_time_flips"]:
        spatial = tuple(a + 1 for a in axes)
        flipped = np.flip(x, spatial) if axes else x
        logits = run_onnx(tmp_path / "m.onnx", flipped[None].astype(np.float32))[0]
        probabilities = np.exp(logits - logits.max(axis=0))
        probabilities /= probabilities.sum(axis=0)
        mean = mean + (np.flip(probabilities, spatial) if axes else probabilities)
    mask = np.asarray(mean).argmax(axis=0) > 0
    assert 0 < predicted.sum() < predicted.size
    assert np.array_equal(mask, predicted)


def test_contract_sliding_window_reproduces_predict_logits() -> None:
    torch.manual_seed(0)
    net = build_network(SPEC_2D).eval()
    window = sliding_window(SPEC_2D)
    # Not a multiple of the patch on either side: windows overlap unevenly and the
    # last ones are shifted inwards, where a wrong overlap or mode would show.
    x = torch.randn(1, 3, 45, 70, generator=torch.Generator().manual_seed(6))
    expected = predict_logits(net, x[0].numpy(), Tiling.of(SPEC_2D), torch.device("cpu"))
    with torch.no_grad():
        actual = sliding_window_inference(x, window["roi_size"], window["windows_per_batch"],
                                          net, overlap=window["overlap"], mode=window["mode"])
    assert isinstance(actual, torch.Tensor)
    assert torch.equal(actual, expected)


def test_contract_says_how_a_downsampled_model_resamples(tmp_path: Path) -> None:
    spec = replace(SPEC_3D, downsample=(2, 2, 1))
    model, _ = global_model(tmp_path, spec)
    assert export(model, "onnx", tmp_path / "m.onnx") == 0
    contract = json.loads((tmp_path / "m.onnx.json").read_text())
    assert contract["downsample"] == [2, 2, 1]
    assert "ceil(side / factor) per axis by area averaging" in contract["downsample_how"]
    assert contract["resize"] is None
    model, _ = global_model(tmp_path / "plain", SPEC_3D)
    assert export(model, "onnx", tmp_path / "p.onnx") == 0
    plain = json.loads((tmp_path / "p.onnx.json").read_text())
    assert plain["downsample"] is plain["downsample_how"] is None


def assert_one_line_error(code: int, err: str, *fragments: str) -> None:
    assert code == EXIT_BAD_INPUT, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("fedseg: error: ")
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def test_refuses_to_overwrite_without_force(tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    model, _ = global_model(tmp_path, SPEC_2D)
    out = tmp_path / "m.pt"
    out.write_bytes(b"someone's file")
    assert_one_line_error(export(model, "torchscript", out), capsys.readouterr().err,
                          str(out), "already exists", "--force")
    assert out.read_bytes() == b"someone's file"
    assert export(model, "torchscript", out, "--force") == 0
    assert out.read_bytes() != b"someone's file"
    capsys.readouterr()
    out.unlink()  # the contract is left: it is protected the same way
    assert_one_line_error(export(model, "torchscript", out), capsys.readouterr().err,
                          "m.pt.json", "already exists")
    assert not out.exists()


def _garbage(tmp_path: Path) -> list[str]:
    path = tmp_path / "final_model.pt"
    path.write_bytes(b"\x00not a zip file at all")
    return ["--model", str(path)]


def _not_fedseg(tmp_path: Path) -> list[str]:
    path = tmp_path / "final_model.pt"
    torch.save({"state_dict": {}}, path)
    return ["--model", str(path)]


def _nan_weight(tmp_path: Path) -> list[str]:
    net = build_network(SPEC_2D)
    weights = state_to_numpy(net.state_dict())
    name = next(iter(weights))
    weights[name].flat[0] = np.nan
    path = tmp_path / "final_model.pt"
    Checkpoint(SPEC_2D, weights, 1).save(path)
    return ["--model", str(path)]


def _nan_site_layer(tmp_path: Path) -> list[str]:
    spec = ModelSpec(channels=(4, 8), patch_size=(16, 16), adaptation="local-norm")
    model, state, _, _ = site_model(tmp_path, spec)
    file = state / LOCAL_LAYERS_FILE
    payload = torch.load(file, weights_only=True)
    next(iter(payload["weights"].values())).view(-1)[0] = float("inf")
    torch.save(payload, file)
    return ["--model", str(model), "--site-state", str(state)]


def _site_state_without_local_layers(tmp_path: Path) -> list[str]:
    model, _ = global_model(tmp_path, SPEC_2D)
    (tmp_path / "state").mkdir()
    return ["--model", str(model), "--site-state", str(tmp_path / "state")]


def _site_layers_of_another_model(tmp_path: Path) -> list[str]:
    spec = ModelSpec(channels=(4, 8), patch_size=(16, 16), in_channels=3, adaptation="adapter")
    model, state, _, _ = site_model(tmp_path, spec)
    other = ModelSpec(channels=(4, 8), patch_size=(16, 16), in_channels=1, adaptation="adapter")
    net = build_network(other)
    _, local = split_weights(state_to_numpy(net.state_dict()),
                             local_parameter_names(net, "adapter"))
    save_local_layers(state, "adapter", local)
    return ["--model", str(model), "--site-state", str(state)]


def _adapted_without_site_state(tmp_path: Path) -> list[str]:
    spec = ModelSpec(channels=(4, 8), patch_size=(16, 16), adaptation="adapter")
    model, _, _, _ = site_model(tmp_path, spec)
    return ["--model", str(model)]


def _model(tmp_path: Path) -> list[str]:
    return ["--model", str(global_model(tmp_path, SPEC_2D)[0])]


BAD_INPUT = {
    # case: (arguments beyond --format/--output, output, format, fragments of the line)
    "missing model": (lambda t: ["--model", str(t / "nope.pt")], "out.onnx", "onnx",
                      ["nope.pt", "not found"]),
    "unreadable model": (_garbage, "out.onnx", "onnx", ["final_model.pt", "cannot be read"]),
    "not a fedseg checkpoint": (_not_fedseg, "out.onnx", "onnx",
                                ["final_model.pt", "not a fedseg checkpoint"]),
    "non-finite weights": (_nan_weight, "out.onnx", "onnx",
                           ["final_model.pt", "NaN or infinite"]),
    "non-finite site layer": (_nan_site_layer, "out.pt", "torchscript",
                              [LOCAL_LAYERS_FILE, "NaN or infinite"]),
    "site state for a model without local layers": (
        _site_state_without_local_layers, "out.pt", "torchscript",
        ["state", "no site-local layers", "leave out --site-state"]),
    "site layers of another model": (_site_layers_of_another_model, "out.pt", "torchscript",
                                     [LOCAL_LAYERS_FILE, "does not match"]),
    "adapted model without site state": (_adapted_without_site_state, "out.onnx", "onnx",
                                         ["adapter", "--site-state"]),
    "output in a missing folder": (_model, "no/such/dir/out.onnx", "onnx",
                                   ["no/such/dir", "folder not found"]),
    "output is a folder": (_model, "is-a-folder", "onnx", ["is-a-folder", "is a folder"]),
    "unknown format": (_model, "out.tflite", "tflite",
                       ["--format", "tflite", "torchscript or onnx"]),
    "output is the checkpoint": (_model, "final_model.pt", "torchscript",
                                 ["final_model.pt", "--model checkpoint itself"]),
}


@pytest.mark.parametrize("case", list(BAD_INPUT))
def test_bad_input_gives_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                  case: str) -> None:
    make, output, fmt, fragments = BAD_INPUT[case]
    (tmp_path / "is-a-folder").mkdir()
    args = make(tmp_path)
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    capsys.readouterr()
    code = main(["export", *args, "--format", fmt, "--output", str(tmp_path / output),
                 "--force"])
    assert_one_line_error(code, capsys.readouterr().err, *fragments)
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before
