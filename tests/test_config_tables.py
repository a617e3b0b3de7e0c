"""Each config key is declared once; the README and pyproject.toml are checked against it."""

from __future__ import annotations

import re
import tomllib

import pytest

from client.config import SiteConfig
from server.config import RunConfig
from server.strategies import STRATEGIES
from shared.config import ModelSpec, TrainPlan
from shared.errors import ConfigError
from shared.networks import NETWORKS
from shared.registry import UnknownNameError
from shared.settings import keys, markdown_table, toml_defaults
from tests.conftest import REPO


def readme_table(name: str) -> str:
    text = (REPO / "README.md").read_text()
    match = re.search(rf"<!-- {name} table:[^\n]*-->\n(.*?)<!-- end of {name} table -->",
                      text, flags=re.DOTALL)
    assert match is not None, f"README.md has no generated {name} table"
    return match.group(1)


@pytest.mark.parametrize("name,owner", [("run-config", RunConfig), ("node-config", SiteConfig)])
def test_readme_tables_are_the_declarations(name: str, owner: type) -> None:
    expected = markdown_table(owner)
    assert readme_table(name) == expected, f"paste this into README.md:\n{expected}"


def test_pyproject_run_config_is_the_declared_defaults() -> None:
    table = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    assert table == toml_defaults(RunConfig)


def test_round_config_carries_every_site_setting_under_its_wire_name() -> None:
    sent = RunConfig().round_config(3)
    assert TrainPlan.from_config(sent) == RunConfig().plan(3)
    assert ModelSpec.from_config(sent) == RunConfig().model
    assert keys(RunConfig) >= keys(ModelSpec) | keys(TrainPlan)


def test_bad_round_config_blames_the_server_not_the_site() -> None:
    sent = {**RunConfig().round_config(1), "local-steps": -1}
    with pytest.raises(ConfigError) as info:
        TrainPlan.from_config(sent)
    assert str(info.value).startswith("round config from the server key 'local-steps'")
    assert "same fedseg version" in str(info.value) and "pyproject" not in str(info.value)
    sent = {**RunConfig().round_config(1), "model-patch-size": "60,60"}
    with pytest.raises(ConfigError, match="round config from the server key 'model-patch-size'"):
        ModelSpec.from_config(sent)


def test_node_config_errors_blame_the_node_config() -> None:
    with pytest.raises(ConfigError) as info:
        SiteConfig.from_node_config({"data-path": "x", "dp-delta": 2.0})
    assert str(info.value).startswith("node config key 'dp-delta'")
    SiteConfig.from_node_config({"data-path": "x", "partition-id": 0, "num-partitions": 3})


def test_registries_suggest_the_closest_name() -> None:
    with pytest.raises(ConfigError, match=r"did you mean 'fedprox'\?"):
        RunConfig.from_user_config({"strategy": "fedprx"})
    with pytest.raises(UnknownNameError, match=r"did you mean 'unet'\?"):
        NETWORKS["unett"]
    assert STRATEGIES.names() == ("fedavg", "fedprox", "fedadam", "fedmedian", "fedtrimmedavg",
                                  "krum")
