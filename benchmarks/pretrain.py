r"""A starting model from public data: pretrain on synthetic phantoms, measure it zero-shot.

Run from the repository root::

    python -m benchmarks.pretrain --family lung --out runs/pretrain/lung.pt \\
        --evaluate ../shared/data/chest-xray
    python -m benchmarks.pretrain --family vessel --out runs/pretrain/vessel.pt \\
        --evaluate ../shared/data/retina

The model sees only phantoms of one family of :mod:`simulations.phantom_families`
(drawn from geometric rules and random numbers; no image, label or statistic of
any site), trained through the same data contract, augmentation and trainer as a
site. Its architecture is the one the planner picks for the matching real data
(``fedseg plan --data ../shared/data/chest-xray`` and ``.../retina``; the presets
below, any key overridable with ``--run-config``), so the file is usable as the
run config's ``initial-model`` there. ``--evaluate`` then measures its Dice,
without any training on them, on every site's validation cases (the split the
federation validates on). Beside the checkpoint goes ``<out>.json``: what the
model saw, how it was trained and the Dice.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from client.config import SiteConfig
from client.data_contract import load_case, site_split
from client.trainer import SiteData, SiteTrainer
from server.config import RunConfig
from shared.checkpoint import Checkpoint
from shared.config import ModelSpec
from simulations.phantom_families import FAMILIES
from simulations.pretrain import pretrain
from simulations.sites import find_site_folders
from simulations.starting import DEFAULTS

#: The model each family is pretrained for: what ``fedseg plan`` chooses for the
#: real data it resembles (tests/test_pretrain.py checks the planner agrees).
PRESETS: dict[str, dict[str, Any]] = {
    # chest-xray: 512x512 radiographs, thick structures -> the whole image at 256 px.
    "lung": {"in-channels": 1, "resize": "256,256", "downsample": "none",
             "patch-size": "256,256",
             "channels": "16,32,64,128,256", "normalization": "zscore"},
    # retina: RGB fundus photographs with a dark frame, thin vessels -> native 96 px patches.
    "vessel": {"in-channels": 3, "resize": "none", "downsample": "none",
               "patch-size": "96,96",
               "channels": "16,32,64,128", "normalization": "zscore-fov"},
}


def model_spec(family: str, overrides: Mapping[str, Any]) -> ModelSpec:
    """Return the family's model, with any run-config ``overrides``, as a run would parse it."""
    return RunConfig.from_user_config({**PRESETS[family], **overrides}).model


def zero_shot(data: Path, spec: ModelSpec, weights: Any, threads: int,
              state: Path) -> dict[str, dict[str, float]]:
    """Return the Dice of ``weights`` on every site's validation cases, untrained on them."""
    out = {}
    for folder in find_site_folders(data):
        site = SiteConfig(data_path=folder, state_dir=state / folder.name, device="auto",
                          num_threads=threads)
        _, val_refs = site_split(folder, site.patient_pattern, site.val_fraction)
        val = tuple(load_case(r, spec.in_channels, spec.num_classes, spec.spatial_dims,
                              spec.normalization) for r in val_refs)
        result = SiteTrainer(site, spec, data=SiteData(train=(), val=val)).evaluate(weights)
        out[folder.name] = {"dice": result.dice, "cases": result.num_examples}
        print(f"  {folder.name:<12} zero-shot Dice {result.dice:.3f} on {result.num_examples} "
              "validation cases", flush=True)
    return out


def main(argv: list[str] | None = None) -> int:
    """Pretrain, save the checkpoint and its record, optionally measure zero-shot Dice."""
    from fedseg.cli import _parse_overrides

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", required=True, choices=sorted(FAMILIES))
    parser.add_argument("--out", type=Path, required=True, help="checkpoint to write (.pt)")
    parser.add_argument("--cases", type=int, default=0, help="phantoms to draw")
    parser.add_argument("--steps", type=int, default=0, help="optimiser steps")
    parser.add_argument("--batch", type=int, default=0, help="cases per step")
    parser.add_argument("--seed", type=int, default=0, help="phantom and weight seed")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads for PyTorch")
    parser.add_argument("--run-config", action="append", default=None,
                        help="model keys overriding the family's preset, e.g. \"channels='8,16'\"")
    parser.add_argument("--evaluate", type=Path, default=None, metavar="DATA",
                        help="multi-site folder to measure zero-shot Dice on (validation cases)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    defaults = DEFAULTS[args.family]
    cases = args.cases or defaults["cases"]
    steps = args.steps or defaults["steps"]
    batch = args.batch or defaults["batch"]
    spec = model_spec(args.family, _parse_overrides(args.run_config))
    print(f"pretraining on {cases} '{args.family}' phantoms: {spec.network} "
          f"{','.join(map(str, spec.channels))}, in-channels {spec.in_channels}, patch "
          f"{'x'.join(map(str, spec.patch_size))}, {spec.normalization}", flush=True)
    with tempfile.TemporaryDirectory(prefix="fedseg-pretrain-") as tmp:
        record, weights = pretrain(args.family, spec, Path(tmp), cases, steps, batch,
                                   args.seed, args.threads)
        if args.evaluate is not None:
            print(f"zero-shot on {args.evaluate}", flush=True)
            record["zero_shot"] = zero_shot(args.evaluate, spec, weights, args.threads,
                                            Path(tmp) / "eval-state")
            record["zero_shot_data"] = str(args.evaluate)
    record["model"] = spec.to_config()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    Checkpoint(spec, weights, 0).save(args.out)
    sidecar = args.out.with_name(args.out.name + ".json")
    sidecar.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {args.out} (use it as --run-config \"initial-model='{args.out}'\") and "
          f"{sidecar}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
