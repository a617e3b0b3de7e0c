"""Cross-site evaluation at the end of a simulation: every deployed model on every site.

In a deployment a site's images and its own layers never leave it, so only the
simulation, which holds every site's folder and state, can fill the site x model
matrix. A site deploys the final global model with its own layers (adaptation
modes), or its personal model (personalisation); without either every site deploys
the same global model.
Besides Dice (the training metric) the 95th-percentile Hausdorff distance and the
average surface distance, from MONAI's metrics, in voxels (pixels for 2D).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.metrics import compute_average_surface_distance, compute_hausdorff_distance

from client.config import SiteConfig
from client.trainer import SiteData, SiteTrainer
from shared.atomic import write_text_atomic
from shared.checkpoint import Checkpoint
from shared.metrics import case_dice
from shared.run_files import RunFiles


def _surface(pred: np.ndarray, label: np.ndarray, num_classes: int) -> tuple[float, float]:
    """Return mean HD95 and ASD over foreground classes (NaN where a class is absent)."""
    p = torch.nn.functional.one_hot(torch.from_numpy(pred), num_classes)
    y = torch.nn.functional.one_hot(torch.from_numpy(label), num_classes)
    p = p.movedim(-1, 0)[None].float()
    y = y.movedim(-1, 0)[None].float()
    with np.errstate(all="ignore"):
        hd = compute_hausdorff_distance(p, y, include_background=False, percentile=95)
        asd = compute_average_surface_distance(p, y, include_background=False)
    return float(torch.nanmean(hd)), float(torch.nanmean(asd))


def _mean(values: Sequence[float]) -> float | None:
    finite = [v for v in values if math.isfinite(v)]
    return float(np.mean(finite)) if finite else None


Predictor = Callable[[np.ndarray], np.ndarray]
"""Maps one channel-first, normalised image to its class map at the image's own size."""


def cross_site_matrix(models: Sequence[tuple[str, Predictor]], data: Mapping[str, SiteData],
                      num_classes: int) -> dict[str, Any]:
    """Evaluate every model on every site's validation cases.

    Parameters
    ----------
    models : sequence of (str, callable)
        Each model's name and its predictor.
    data : mapping of str to SiteData
        Every site's cases, by site name; only the validation cases are used.
    num_classes : int
        Classes including background.

    Returns
    -------
    dict
        ``sites``, ``models`` and the ``dice``, ``hd95`` and ``asd`` matrices:
        ``dice[i][j]`` is the mean over site ``i``'s validation cases of model
        ``j``'s foreground Dice (``None`` where nothing was finite).
    """
    dice: list[list[float | None]] = [[None] * len(models) for _ in data]
    hd95: list[list[float | None]] = [[None] * len(models) for _ in data]
    asd: list[list[float | None]] = [[None] * len(models) for _ in data]
    for j, (_, predict) in enumerate(models):
        for i, site_data in enumerate(data.values()):
            scores, hds, asds = [], [], []
            for case in site_data.val:
                pred = predict(case.image)
                scores.append(case_dice(pred, case.label, num_classes))
                h, a = _surface(pred, case.label, num_classes)
                hds.append(h)
                asds.append(a)
            dice[i][j] = _mean(scores)
            hd95[i][j] = _mean(hds)
            asd[i][j] = _mean(asds)
    return {"sites": list(data), "models": [name for name, _ in models], "dice": dice,
            "hd95": hd95, "asd": asd, "metric_units": "voxels"}


def cross_site_evaluation(run_dir: Path, sites: Sequence[SiteConfig]) -> dict[str, Any]:
    """Evaluate each site's deployed model on every site's validation cases.

    Returns
    -------
    dict
        The :attr:`shared.run_files.RunFiles.cross_site_json` format, plus ``hd95``
        and ``asd`` matrices of the same shape (mean over cases, voxels).
    """
    files = RunFiles(run_dir)
    checkpoint = Checkpoint.load(files.final_model)
    spec = checkpoint.spec
    data = {site.site_name: SiteData.load(site, spec) for site in sites}
    own = spec.adaptation != "none" or spec.personalization != "none"
    owners = list(sites) if own else [sites[0]]
    models: list[tuple[str, Predictor]] = []
    for owner in owners:
        # The owner's trainer loads its own layers and personal model from its state folder.
        trainer = SiteTrainer(owner, spec, data[owner.site_name])
        name = f"{owner.site_name} deployed" if own else "global"
        models.append((name, partial(trainer.predict, checkpoint.weights)))
    return {**cross_site_matrix(models, data, spec.num_classes),
            "round": checkpoint.server_round}


def write_cross_site(run_dir: Path, sites: Sequence[SiteConfig]) -> Path:
    """Compute the cross-site evaluation and write it into the run folder."""
    result = cross_site_evaluation(run_dir, sites)
    path = RunFiles(run_dir).cross_site_json
    write_text_atomic(path, json.dumps(result, indent=2) + "\n")
    return path
