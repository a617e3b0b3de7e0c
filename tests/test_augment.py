"""Training patches: every draw has the patch's shape, so a batch can be stacked."""

from __future__ import annotations

import numpy as np
import pytest

from client.augment import PatchDataset


@pytest.mark.parametrize("patch", [(12, 20), (20, 12), (8, 12, 4), (12, 12, 4)],
                         ids=["wide", "tall", "3d-not-square", "3d-square"])
def test_every_patch_has_the_planned_shape(patch: tuple[int, ...]) -> None:
    # A quarter turn of a non-square patch would swap its sides (the planner gives
    # 56x64x40 for the left atrium): every draw must keep the patch's shape.
    rng = np.random.default_rng(0)
    shape = tuple(2 * p + 3 for p in patch)
    images = [rng.standard_normal((1, *shape)).astype(np.float32) for _ in range(2)]
    labels = [(rng.random(shape) > 0.7).astype(np.int64) for _ in range(2)]
    data = PatchDataset(images, labels, patch, seed=1)
    shapes = {(tuple(data[i % 2][0].shape), tuple(data[i % 2][1].shape)) for i in range(40)}
    assert shapes == {((1, *patch), (1, *patch))}


def test_crops_centre_on_every_class_alike_when_labels_code_several() -> None:
    # A 2x2 second structure beside a large first one: a crop centred on any
    # foreground would hold it about 4 / 404 of the time; per class, a third of it.
    image = np.zeros((1, 64, 64), dtype=np.float32)
    label = np.zeros((64, 64), dtype=np.int64)
    label[4:24, 4:24] = 1
    label[50:52, 50:52] = 2
    patch = (8, 8)
    several = PatchDataset([image], [label], patch, seed=3, augment=False, num_classes=3)
    share = np.mean([bool((several[0][1] == 2).any()) for _ in range(300)])
    assert 0.25 < share < 0.45
    # One foreground (binary crops, as before): the small square, marked in the
    # image, is all but missed.
    small = np.zeros((64, 64), dtype=np.float32)
    small[50:52, 50:52] = 1.0
    marked = PatchDataset([small[None]], [np.minimum(label, 1)], patch, seed=3, augment=False)
    assert np.mean([bool(marked[0][0].sum() > 0) for _ in range(300)]) < 0.1
