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
