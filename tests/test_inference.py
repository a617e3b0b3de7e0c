"""Sliding-window inference: batched windows, odd image sizes, the tiling's batch size."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.inferers import sliding_window_inference
from torch import nn

from benchmarks.predict_latency import count_windows
from client.inference import (
    BLEND_MODE,
    MAX_WINDOWS_PER_BATCH,
    Tiling,
    class_map,
    predict_classes,
    predict_logits,
    predict_probabilities,
)
from client.preprocess import resize_image, resize_logits
from shared.config import ModelSpec
from shared.networks import build_network

CPU = torch.device("cpu")


class Pointwise(nn.Module):
    """Logits (x, -x) per voxel: any tiling that blends correctly reproduces them exactly."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x[:, :1], -x[:, :1]], dim=1)


@pytest.mark.parametrize(("spec", "shape"), [
    (ModelSpec(channels=(4, 8), patch_size=(16, 16), in_channels=3), (101, 77)),
    (ModelSpec(channels=(4, 8), patch_size=(8, 8, 8)), (40, 27, 20)),
], ids=["2d", "3d"])
def test_batched_windows_give_the_logits_of_one_window_at_a_time(
        spec: ModelSpec, shape: tuple[int, ...]) -> None:
    torch.manual_seed(0)
    net = build_network(spec).eval()
    tiling = Tiling.of(spec)
    # Several forward passes, the last one partly filled: every batching path is used.
    windows = count_windows(shape, tiling)
    assert 1 < tiling.windows_per_batch < windows
    assert windows % tiling.windows_per_batch
    image = torch.randn(spec.in_channels, *shape, generator=torch.Generator().manual_seed(1))
    batched = predict_logits(net, image.numpy(), tiling, CPU)
    with torch.no_grad():
        one_at_a_time = sliding_window_inference(image[None], tiling.patch_size, 1, net,
                                                 overlap=tiling.overlap, mode=BLEND_MODE)
    assert isinstance(one_at_a_time, torch.Tensor)
    assert batched.shape == (1, spec.num_classes, *shape)
    assert float(one_at_a_time.std()) > 1e-3  # a real comparison, not two constant maps
    torch.testing.assert_close(batched, one_at_a_time, rtol=0, atol=1e-5)


@pytest.mark.parametrize("shape", [(5, 7), (16, 16), (17, 40), (33, 9, 4)],
                         ids=["below-patch", "one-patch", "odd", "3d-odd"])
def test_every_voxel_gets_its_own_logits_whatever_the_size(shape: tuple[int, ...]) -> None:
    # Images smaller than the patch are padded and cropped back; others tiled with
    # shifted last windows. A pointwise network shows any voxel that lands elsewhere.
    tiling = Tiling((16,) * len(shape))
    image = np.random.default_rng(2).standard_normal((1, *shape)).astype(np.float32)
    logits = predict_logits(Pointwise(), image, tiling, CPU)
    assert logits.shape == (1, 2, *shape)
    np.testing.assert_allclose(logits[0, 0].numpy(), image[0], rtol=0, atol=1e-5)
    np.testing.assert_array_equal(predict_classes(Pointwise(), image, tiling, CPU),
                                  (image[0] < 0).astype(np.int64))


class Counting(Pointwise):
    """:class:`Pointwise`, counting the windows it was shown."""

    def __init__(self) -> None:
        super().__init__()
        self.windows = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.windows += x.shape[0]
        return super().forward(x)


def test_a_downsampled_model_sees_each_image_shrunk_and_answers_at_full_size() -> None:
    # Each image shrinks by its own factors (not to one fixed size): the windows are
    # those of the shrunk image. The logits come back at the image's own size, so
    # masks and Dice stay at full resolution.
    spec = ModelSpec(channels=(4, 8), patch_size=(8, 8, 4), downsample=(2, 2, 1),
                     test_time_flips=False)
    tiling = Tiling.of(spec)
    assert tiling.downsample == (2, 2, 1)
    for shape, work in (((32, 30, 8), (16, 15, 8)), ((31, 17, 5), (16, 9, 5))):
        assert spec.working_size(shape) == work
        net = Counting()
        image = np.full((1, *shape), 3.0, dtype=np.float32)
        logits = predict_logits(net, image, tiling, CPU)
        assert logits.shape == (1, 2, *shape)
        np.testing.assert_allclose(logits[0, 0].numpy(), 3.0, atol=1e-5)
        assert net.windows == count_windows(work, tiling) < count_windows(shape, tiling)
    # On a ramp: exactly the shrunk image's logits, resampled back to the image's size.
    ramp = np.arange(32 * 30 * 8, dtype=np.float32).reshape(1, 32, 30, 8) / 1000
    logits = predict_logits(Pointwise(), ramp, tiling, CPU)
    shrunk = torch.from_numpy(resize_image(ramp, (16, 15, 8)))[None]
    expected = resize_logits(torch.cat([shrunk, -shrunk], dim=1), (32, 30, 8))
    torch.testing.assert_close(logits, expected, rtol=0, atol=1e-5)


def test_windows_per_batch_follows_the_voxel_budget() -> None:
    assert Tiling((96, 96)).windows_per_batch == MAX_WINDOWS_PER_BATCH
    assert Tiling((32, 32, 32)).windows_per_batch == MAX_WINDOWS_PER_BATCH
    assert Tiling((56, 56, 48)).windows_per_batch == 6  # 2**20 // 150528
    assert Tiling((64, 64, 64)).windows_per_batch == 4
    assert Tiling((96, 96, 96)).windows_per_batch == 1
    assert Tiling((128, 128, 128)).windows_per_batch == 1  # above the budget: one at a time


def test_tiling_of_a_model_spec() -> None:
    spec = ModelSpec(patch_size=(32, 48), resize=(64, 96))
    assert Tiling.of(spec) == Tiling((32, 48), (64, 96), 0.25, ((), (0,), (1,), (0, 1)))
    assert Tiling.of(spec).single_pass() == Tiling((32, 48), (64, 96), 0.25)
    # Whole resized images were never flipped in training, so they are not at test time.
    assert Tiling.of(ModelSpec(patch_size=(64, 96), resize=(64, 96))).flips == ((),)
    assert Tiling.of(ModelSpec(patch_size=(8, 8, 8), test_time_flips=False)).flips == ((),)
    assert len(Tiling.of(ModelSpec(patch_size=(8, 8, 8))).flips) == 8


def test_test_time_flips_average_the_probabilities_of_each_flipped_pass() -> None:
    torch.manual_seed(0)
    net = nn.Conv2d(1, 2, 3, padding=1)
    image = np.random.default_rng(0).normal(size=(1, 16, 16)).astype(np.float32)
    one = Tiling((16, 16))
    expected = predict_probabilities(net, image, one, torch.device("cpu"))
    for axes in ((0,), (1,), (0, 1)):
        flipped = np.flip(image, axis=tuple(a + 1 for a in axes)).copy()
        back = predict_probabilities(net, flipped, one, torch.device("cpu"))
        expected = expected + torch.flip(back, dims=[a + 1 for a in axes])
    tiling = Tiling.of(ModelSpec(patch_size=(16, 16)))
    got = predict_classes(net, image, tiling, torch.device("cpu"))
    np.testing.assert_array_equal(got, class_map(expected / 4))
    # A random kernel is not symmetric, so the flipped passes differ from the plain one.
    single = predict_probabilities(net, image, one, torch.device("cpu"))
    assert not torch.allclose(expected / 4, single)


def test_class_map_is_the_argmax_with_ties_to_the_lower_class() -> None:
    scores = torch.tensor([[[0.0, 1.0, 2.0, 5.0]],
                           [[0.0, 3.0, 2.0, 4.0]],
                           [[-1.0, 3.0, 2.0, 5.0]]])
    np.testing.assert_array_equal(class_map(scores), [[0, 1, 0, 0]])
    assert class_map(scores).dtype == np.int64
    rng = torch.Generator().manual_seed(3)
    # Rounded, so many voxels tie between two or three classes.
    many = torch.round(torch.randn(3, 40, 30, generator=rng))
    np.testing.assert_array_equal(class_map(many), many.argmax(dim=0).numpy())
