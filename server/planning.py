"""The planning round: ask every site for its data fingerprint, then plan the run.

It runs before round 1 whenever the run config leaves a planned key at ``auto``.
The reply of a site holds only the declared aggregate numbers
(:data:`shared.planning.FINGERPRINT_KEYS`); anything else is refused.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any

from flwr.app import Message, RecordDict
from flwr.serverapp import Grid

from server.config import RunConfig
from server.federation import NotEnoughSitesError, wait_for_nodes
from shared import protocol as p
from shared.personalization import PERSONALIZATIONS
from shared.planning import Fingerprint, Plan, PlanningError, make_plan, overridden

log = logging.getLogger("fedseg.server")


def collect_fingerprints(grid: Grid, config: RunConfig) -> list[Fingerprint]:
    """Send the fingerprint query to every connected site and parse the replies.

    Raises
    ------
    NotEnoughSitesError
        Fewer than ``min-train-nodes`` sites sent a usable fingerprint.
    """
    nodes = wait_for_nodes(grid, config.min_available_nodes, config.node_wait_timeout)
    sent = [Message(content=RecordDict(), dst_node_id=node, message_type=p.FINGERPRINT_QUERY,
                    group_id="plan") for node in nodes]
    fingerprints: list[Fingerprint] = []
    for msg in grid.send_and_receive(sent, timeout=config.round_timeout):
        node = msg.metadata.src_node_id
        if msg.has_error():
            log.warning("site node-%s sent no fingerprint: %s", node, msg.error.reason)
            continue
        try:
            fingerprints.append(Fingerprint.from_record(
                msg.content.metric_records[p.FINGERPRINT], f"site node-{node}"))
        except (KeyError, PlanningError) as exc:
            log.warning("site node-%s sent a malformed fingerprint: %s", node, exc)
    if len(fingerprints) < config.min_train_nodes:
        raise NotEnoughSitesError(
            f"only {len(fingerprints)} of {len(nodes)} sites sent a data fingerprint, fewer than "
            f"min-train-nodes ({config.min_train_nodes}); check the sites' logs, or set every "
            "planned key (resize, patch-size, channels, ...) in the run config")
    return fingerprints


def planned_run_config(grid: Grid, values: Mapping[str, Any],
                       echo: Callable[[str], None]) -> tuple[RunConfig, Plan | None]:
    """Return the run config with every ``auto`` key planned from the sites' fingerprints.

    A run config that sets every planned key is parsed as it is, with no planning round.
    """
    if not RunConfig.needs_plan(values):
        return RunConfig.from_user_config(values), None
    plan = make_plan(collect_fingerprints(grid, RunConfig.from_user_config(values)))
    planned = plan.to_run_config(values)
    config = RunConfig.from_user_config(values, planned)
    for line in plan.reasons:
        echo(f"plan: {line}")
    # The reasons explain the plan; what runs differs where the run config says so.
    changed = overridden(planned, values, skip=("finetune-steps",))
    if changed:
        echo(f"plan: the run config sets {', '.join(changed)}")
    # What runs, not what was planned: the user's finetune-steps, if set, wins too.
    finetune = config.training.finetune_length(config.training.local_steps)
    if PERSONALIZATIONS[config.model.personalization].finetunes and finetune != plan.finetune_steps:
        echo(f"plan: the run config's rounds or steps make the deployed fine-tune {finetune} steps")
    return config, plan
