"""Cross-site evaluation: every deployed model on every site's validation cases."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from client.config import SiteConfig
from client.site_state import save_local_layers
from server.app import initial_weights
from server.config import RunConfig
from shared.checkpoint import Checkpoint
from shared.networks import build_network
from shared.partition import local_parameter_names, split_weights
from shared.run_files import RunFiles
from shared.weights import state_to_numpy
from simulations.cross_site import write_cross_site
from simulations.phantoms import write_synthetic_federation


def _sites(tmp_path: Path) -> list[SiteConfig]:
    folders = write_synthetic_federation(tmp_path / "data", num_sites=2, cases_per_site=5,
                                         shape=(32, 32))
    return [SiteConfig(data_path=f, site_name=f.name, state_dir=tmp_path / "state" / f.name,
                       device="cpu", num_threads=1, val_fraction=0.4) for f in folders]


@pytest.mark.parametrize("adaptation", ["none", "local-norm"])
def test_matrix_has_a_model_per_site_only_with_site_layers(tmp_path: Path,
                                                           adaptation: str) -> None:
    config = RunConfig.from_user_config({"channels": "8,16", "patch-size": "32,32",
                                         "adaptation": adaptation})
    sites = _sites(tmp_path)
    run = tmp_path / "run"
    Checkpoint(config.model, initial_weights(config), 3).save(RunFiles(run).final_model)
    net = build_network(config.model)
    names = local_parameter_names(net, adaptation)
    for k, site in enumerate(sites):
        _, local = split_weights(state_to_numpy(net.state_dict()), names)
        # Different own layers per site: their deployed models must differ.
        save_local_layers(site.state_dir, adaptation,
                          {n: v + np.float32(k) for n, v in local.items()})
    result = json.loads(write_cross_site(run, sites).read_text())
    assert result["sites"] == [s.site_name for s in sites]
    expected = (["global"] if adaptation == "none"
                else [f"{s.site_name} deployed" for s in sites])
    assert result["models"] == expected
    dice = np.array(result["dice"], dtype=float)
    assert dice.shape == (2, len(expected))
    assert np.all((dice >= 0) & (dice <= 1))
    assert np.array(result["hd95"], dtype=float).shape == dice.shape
    assert result["round"] == 3
    if adaptation != "none":
        assert not np.array_equal(dice[:, 0], dice[:, 1])
