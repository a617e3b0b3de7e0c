"""The coordinator's round loop: train, aggregate, checkpoint, evaluate, record.

Flower's ``Strategy.start`` runs the same loop but keeps per-site results to
itself; fedseg needs every site's numbers in the history and a checkpoint after
every round, so the loop is written out here around the strategy's own
``configure_*`` and ``aggregate_*`` methods. All run state lives in
:class:`FederationState`; files are written only by :class:`RunFolder`.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, cast

from flwr.app import ArrayRecord, ConfigRecord, Message
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from server.config import RunConfig
from server.deadline import (
    SYSTEM_CLOCK,
    Asked,
    ChosenSites,
    Clock,
    ask,
    choose_nodes,
    late_note,
    no_reply_note,
)
from server.history import MetricsHistory, RoundRecord, SiteRound
from server.resume import ResumeState
from server.strategies import CENTRAL_DP, SITE_WEIGHTINGS, base_strategy, build_strategy
from server.validation import norm_outliers, step_problem, update_norm, update_problem
from shared import protocol as p
from shared.atomic import write_text_atomic
from shared.checkpoint import Checkpoint
from shared.errors import FedsegError
from shared.planning import Plan
from shared.privacy import noise_weights
from shared.run_files import RunFiles
from shared.trainable import merge_trainable, shared_trainable_names
from shared.weights import (
    TRANSFER_DTYPES,
    NDArrays,
    as_dtypes,
    for_wire,
    from_record,
    to_record,
)

log = logging.getLogger("fedseg.server")


class NotEnoughSitesError(FedsegError):
    """Too few sites connected, or replied, for the run to go on."""


class Reporter(Protocol):
    """Receives progress; the console and Flower's log are two implementations."""

    def round_finished(self, record: RoundRecord, num_rounds: int) -> None:
        """Report a completed round."""


@dataclass
class FederationState:
    """Everything the coordinator needs to continue a run."""

    server_round: int
    weights: NDArrays
    history: MetricsHistory
    # Messages whose round deadline passed unanswered, by id: a reply to one is late.
    late: dict[str, Asked] = field(default_factory=dict)


@dataclass(frozen=True)
class RunFolder(RunFiles):
    """Where a run's checkpoints, metrics and final model are written."""

    def save_round(self, state: FederationState, config: RunConfig) -> None:
        """Write the round's checkpoint and the metrics history so far."""
        Checkpoint(config.model, state.weights, state.server_round).save(
            self.checkpoint(state.server_round))
        state.history.write(self)

    def save_resume(self, state: FederationState, config: RunConfig, strategy: Strategy) -> None:
        """Write what a resumed run needs to continue after this round."""
        ResumeState.capture(state.server_round, state.weights, state.history, config,
                            strategy).save(self.resume_state)

    def save_final(self, state: FederationState, config: RunConfig) -> None:
        """Write the final model."""
        Checkpoint(config.model, state.weights, state.server_round).save(self.final_model)

    def save_plan(self, plan: Plan, values: Mapping[str, Any] | None = None) -> None:
        """Write the plan made from the sites' fingerprints, with its reasons.

        Every value is the planner's; ``values``, the user's run config, only sizes
        the planned fine-tune to the user's rounds and steps (:meth:`Plan.to_run_config`).
        A key the user sets, ``finetune-steps`` included, still overrides its value.
        """
        text = json.dumps({"run-config": plan.to_run_config(values),
                           "reasons": list(plan.reasons)}, indent=2)
        self.path.mkdir(parents=True, exist_ok=True)
        write_text_atomic(self.plan_json, text + "\n")


def wait_for_nodes(grid: Grid, needed: int, timeout: float,
                   clock: Callable[[], float] = time.monotonic,
                   sleep: Callable[[float], None] = time.sleep) -> list[int]:
    """Wait until ``needed`` sites are connected; fail clearly after ``timeout`` seconds."""
    deadline = clock() + timeout
    while True:
        nodes = list(grid.get_node_ids())
        if len(nodes) >= needed:
            return nodes
        if clock() >= deadline:
            raise NotEnoughSitesError(
                f"only {len(nodes)} of the {needed} required sites connected within "
                f"{timeout:.0f} s; start the missing SuperNodes or lower min-available-nodes "
                "in the run config"
            )
        sleep(1.0)


def _number(record: Mapping[str, object], key: str) -> float:
    """Return ``record[key]`` as a finite number, or raise ``ValueError`` naming the key."""
    value = record.get(key)
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError(f"'{key}' is {value!r}, expected a finite number")
    return float(value)


def _per_class(metrics: Mapping[str, object]) -> list[float] | None:
    """Return each class's Dice in class order (``None``: not sent, a binary task)."""
    classes = sorted(int(k.removeprefix(p.VAL_DICE_CLASS)) for k in metrics
                     if k.startswith(p.VAL_DICE_CLASS)
                     and k.removeprefix(p.VAL_DICE_CLASS).isdigit())
    if not classes:
        return None
    if classes != list(range(1, len(classes) + 1)) or len(classes) < 2:
        raise ValueError(f"'{p.VAL_DICE_CLASS}N' sent for classes {classes}, expected 1 to "
                         "num-classes - 1; every site must run the same fedseg version")
    return [_number(metrics, f"{p.VAL_DICE_CLASS}{c}") for c in classes]


def _read_reply(entry: SiteRound, msg: Message, phase: str) -> bool:
    """Copy a site's numbers into ``entry``; return whether its update may be aggregated."""
    metrics = msg.content.metric_records[p.METRICS]
    if phase != "train":
        num_val_cases = int(_number(metrics, p.NUM_EXAMPLES))
        val_dice = _number(metrics, p.VAL_DICE) if num_val_cases else None
        per_class = _per_class(metrics) if num_val_cases else None
        # Stored only when the whole reply reads: a malformed one counts nowhere.
        entry.num_val_cases, entry.val_dice = num_val_cases, val_dice
        entry.val_dice_per_class = per_class
        return True
    cases_key = p.TRAIN_CASES if p.TRAIN_CASES in metrics else p.NUM_EXAMPLES
    entry.num_train_cases = int(_number(metrics, cases_key))
    entry.train_steps = int(_number(metrics, p.TRAIN_STEPS))
    privacy = msg.content.config_records.get(p.PRIVACY)
    if privacy is not None and privacy.get(p.DP):
        entry.epsilon = _number(privacy, p.EPSILON)
        entry.delta = _number(privacy, p.DELTA)
        # Older sites do not send it; 'dp-noise' weighting then refuses their update.
        if p.NOISE_STD in privacy:
            std = _number(privacy, p.NOISE_STD)
            if std < 0:
                raise ValueError(f"'{p.NOISE_STD}' is {std}, expected at least 0")
            entry.noise_std = std
    elif privacy is not None:
        entry.noise_std = 0.0
    if privacy is not None and privacy.get(p.REFUSED):
        # An explicit, recorded refusal: the site's budget would be exceeded.
        entry.refused = str(privacy.get(p.REASON, "refused"))
        log.warning("site %s refused to train: %s", entry.site, entry.refused)
        return False
    if p.ARRAYS not in msg.content.array_records:
        raise ValueError("no weights in a train reply")
    entry.train_loss = _number(metrics, p.TRAIN_LOSS)
    return True


def _add_error(entry: SiteRound, note: str) -> None:
    # Both phases may fail for one site in one round; keep both notes.
    entry.error = f"{entry.error}; {note}" if entry.error else note


def _record_replies(record: RoundRecord, sent: list[Message], replies: Iterable[Message],
                    phase: str, known: Mapping[int, str]) -> list[Message]:
    """Store each site's reply in ``record``; return the replies fit for aggregation.

    A reply with an error, a refusal or malformed content is recorded against its
    site and left out, so one bad site never stops the round for the others.
    """
    ok: list[Message] = []
    answered: set[int] = set()
    # The SuperLink answers for a node that stopped heartbeating, so the error's
    # source is the SuperLink; the message it replies to names the site.
    dst_of = {m.metadata.message_id: m.metadata.dst_node_id for m in sent
              if m.metadata.message_id}
    for msg in replies:
        node = dst_of.get(msg.metadata.reply_to_message_id, msg.metadata.src_node_id)
        answered.add(node)
        if msg.has_error():
            entry = record.site(node, known.get(node, ""))
            _add_error(entry, f"{phase}: {msg.error.reason}")
            log.warning("site node-%s failed in %s: %s", node, phase, msg.error.reason)
            continue
        tag = msg.content.config_records.get(p.SITE)
        name = str(tag[p.SITE_NAME]) if tag is not None and p.SITE_NAME in tag else ""
        entry = record.site(node, name)
        try:
            usable = _read_reply(entry, msg, phase)
        except (KeyError, ValueError) as exc:
            _add_error(entry, f"{phase}: malformed reply ({exc})")
            log.warning("site %s sent a malformed %s reply: %s", entry.site, phase, exc)
            continue
        if usable:
            ok.append(msg)
    for msg in sent:
        if msg.metadata.dst_node_id not in answered:
            entry = record.site(msg.metadata.dst_node_id, known.get(msg.metadata.dst_node_id, ""))
            _add_error(entry, no_reply_note(phase))
    return ok


def _entry_of(record: RoundRecord, msg: Message) -> SiteRound:
    """Return the round's record of the site that sent ``msg``."""
    return next(s for s in record.sites if s.node_id == msg.metadata.src_node_id)


def _reject_update(entry: SiteRound, problem: str) -> None:
    """Record, and log, why the server left the site's update out of the aggregate."""
    entry.error = f"train: update rejected ({problem})"
    log.warning("site %s: update rejected: %s", entry.site, problem)


def _reject_bad_updates(record: RoundRecord, replies: list[Message], reference: NDArrays,
                        config: RunConfig) -> list[Message]:
    """Drop, and record against their site, updates of the wrong layout or size.

    Updates are checked as they arrived (in the run's transfer-dtype); the accepted
    ones are converted in place to the dtypes of ``reference``, so the strategy
    (central-DP wrappers included) aggregates in the server's own precision.
    """
    checked: list[tuple[SiteRound, Message, float]] = []
    transfer = config.training.transfer_dtype
    for msg in replies:
        entry = _entry_of(record, msg)
        update = from_record(msg.content.array_records[p.ARRAYS])
        problem = update_problem(reference, update, transfer)
        if problem is not None:
            _reject_update(entry, problem)
            continue
        if TRANSFER_DTYPES[transfer] is not None:
            msg.content.array_records[p.ARRAYS] = to_record(as_dtypes(update, reference))
        checked.append((entry, msg, update_norm(reference, update)))
    outliers = norm_outliers({str(e.node_id): n for e, _, n in checked},
                             config.update_norm_ratio, config.max_update_norm)
    for entry, _, _ in checked:
        if str(entry.node_id) in outliers:
            _reject_update(entry, outliers[str(entry.node_id)])
    return [msg for entry, msg, _ in checked if str(entry.node_id) not in outliers]


def expected_names(config: RunConfig, weights: NDArrays) -> frozenset[str]:
    """Return the parameter names every train reply must hold, no more and no fewer.

    The shared parameters of the run's ``dp-trainable`` group; with ``all``, every
    shared parameter of the global model.
    """
    if config.training.trainable == "all":
        return frozenset(weights)
    return shared_trainable_names(config.model, config.training.trainable)


def _weigh_by_noise(record: RoundRecord, replies: list[Message]) -> list[Message]:
    """Set each update's FedAvg weight to :func:`shared.privacy.noise_weights` of its noise.

    Returns the replies that can be weighed; one whose site did not report its
    DP-SGD noise is dropped and recorded against the site, as a malformed update is.
    """
    known: list[tuple[SiteRound, Message, float]] = []
    for msg in replies:
        entry = _entry_of(record, msg)
        if entry.noise_std is None:
            _reject_update(entry, f"site-weighting 'dp-noise' needs the site's "
                                  f"'{p.NOISE_STD}'; update fedseg at that site")
        else:
            known.append((entry, msg, entry.noise_std))
    for (entry, msg, _), weight in zip(known, noise_weights([s for *_, s in known]),
                                       strict=True):
        entry.weight = weight
        msg.content.metric_records[p.METRICS][p.NUM_EXAMPLES] = weight
    return [msg for _, msg, _ in known]


def _complete_updates(replies: list[Message], weights: NDArrays) -> None:
    """Give each reply the global values of the parameters it did not train, in place.

    Every strategy then sees whole models (FedAdam's server step and the central-DP
    wrappers pair arrays with the global model's), and the frozen part of the
    aggregate is put back to its exact global values afterwards.
    """
    for msg in replies:
        update = from_record(msg.content.array_records[p.ARRAYS])
        if len(update) < len(weights):
            msg.content[p.ARRAYS] = to_record(merge_trainable(weights, update, update))



def _on_the_wire(messages: list[Message], transfer: str) -> list[Message]:
    """Return ``messages`` with their weights in the run's transfer-dtype.

    The strategy was given the server's own float32 weights, so whatever it keeps
    (FedAdam's current arrays, the server-side DP wrapper's reference) stays
    float32; only the copy that travels is cast. Flower's strategies share one
    payload between all messages of a round, so each payload is cast once.
    """
    if TRANSFER_DTYPES[transfer] is None:
        return messages
    cast: dict[int, ArrayRecord] = {}
    for msg in messages:
        record = msg.content.array_records.get(p.ARRAYS)
        if record is None:
            continue
        if id(record) not in cast:
            cast[id(record)] = to_record(for_wire(from_record(record), transfer))
        msg.content.array_records[p.ARRAYS] = cast[id(record)]
    return messages



def _has_weights(msg: Message) -> bool:
    """Whether a train reply brings weights (no error, no refusal)."""
    if msg.has_error() or p.ARRAYS not in msg.content.array_records:
        return False
    privacy = msg.content.config_records.get(p.PRIVACY)
    return not (privacy is not None and privacy.get(p.REFUSED))


def _answered(msg: Message) -> bool:
    return not msg.has_error()


def _asking(rnd: int, phase: str, attempt: int) -> Callable[[Message], Asked]:
    """Return what a message of this phase is, for recognising its late reply."""
    return lambda msg: Asked(rnd, phase, attempt, msg.metadata.dst_node_id)


def _record_late(record: RoundRecord | None, asked: Asked, msg: Message,
                 known: Mapping[int, str]) -> None:
    """Note a reply that came after its deadline against its round; it is never used."""
    note = late_note(asked.phase, msg)
    tag = None if msg.has_error() else msg.content.config_records.get(p.SITE)
    name = str(tag[p.SITE_NAME]) if tag is not None and p.SITE_NAME in tag else ""
    name = name or known.get(asked.node_id, "")
    log.warning("round %d: %s's %s reply came after round-timeout and is not used",
                asked.server_round, name or f"node-{asked.node_id}", asked.phase)
    # A reply to an abandoned attempt of a retried round has no entry to amend.
    if record is None or record.retries != asked.attempt:
        return
    entry = record.site(asked.node_id, name)
    missing = no_reply_note(asked.phase)
    if entry.error and missing in entry.error:
        entry.error = entry.error.replace(missing, note)
    else:
        _add_error(entry, note)


def _configure(build: Callable[[int, ArrayRecord, ConfigRecord, Grid], Iterable[Message]],
               rnd: int, weights: NDArrays, config: ConfigRecord, grid: Grid,
               nodes: list[int]) -> list[Message]:
    """Return the strategy's messages for exactly ``nodes``, built without Flower's sampling."""
    if not nodes:
        raise NotEnoughSitesError("no site is connected; start the SuperNodes")
    sent = list(build(rnd, to_record(weights), config, cast(Grid, ChosenSites(grid, nodes))))
    if sorted(m.metadata.dst_node_id for m in sent) != nodes:
        # Only a strategy built with a fraction or minimum of its own could do this.
        raise RuntimeError("the strategy chose its own sites; build it with "
                           "server.strategies.build_strategy")
    return sent


def run_round(grid: Grid, strategy: Strategy, config: RunConfig, state: FederationState,
              clock: Clock = SYSTEM_CLOCK) -> FederationState:
    """Run one round of training and evaluation and return the new state.

    Each phase asks the connected sites and waits for all of them, but no longer
    than ``round-timeout``. Training goes on with the sites that sent weights in
    time if they are at least ``min-train-nodes``; otherwise it is sent again, up
    to ``round-retries`` times, and then the run stops. Replies after the deadline
    are recorded as late and never aggregated.

    Parameters
    ----------
    grid : flwr.serverapp.Grid
        Connection to the sites.
    strategy : Strategy
        Flower strategy from :func:`build_strategy` that builds messages and aggregates.
    config : RunConfig
        The run's settings.
    state : FederationState
        State after the previous round.
    clock : Clock
        Time source and sleep (scripted in tests).

    Returns
    -------
    FederationState
        The new global weights and the history with this round appended. If
        updates are rejected or the server step is refused, the previous weights
        are kept.

    Raises
    ------
    NotEnoughSitesError
        Too few sites connected within ``node-wait-timeout``, or fewer than
        ``min-train-nodes`` sent weights in time in every attempt (the last
        attempt's record is then appended to the history).
    """
    rnd = state.server_round + 1
    transfer = config.training.transfer_dtype
    known = state.history.site_names()
    record = RoundRecord(round=rnd)

    def on_late(asked: Asked, msg: Message) -> None:
        rounds = [*state.history.rounds, record]
        _record_late(next((r for r in rounds if r.round == asked.server_round), None),
                     asked, msg, known)

    base = base_strategy(strategy)
    for attempt in range(config.round_retries + 1):
        record = RoundRecord(round=rnd, retries=attempt)
        nodes = wait_for_nodes(grid, max(config.min_available_nodes, config.min_train_nodes),
                               config.node_wait_timeout, clock.now, clock.sleep)
        chosen = choose_nodes(nodes, base.fraction_train, config.min_train_nodes,
                              f"{config.training.seed}:{rnd}:{attempt}:train")
        started = clock.now()
        sent = _on_the_wire(_configure(strategy.configure_train, rnd, state.weights,
                                       ConfigRecord(config.round_config(rnd)), grid, chosen),
                            transfer)
        replies, _ = ask(grid, sent, _asking(rnd, "train", attempt),
                         config.min_train_nodes, _has_weights, started + config.round_timeout,
                         clock, state.late, on_late)
        record.train_seconds = clock.now() - started
        ok = _record_replies(record, sent, replies, "train", known)
        if len(ok) >= config.min_train_nodes:
            break
        log.warning("round %d: %d of the required %d sites sent weights within round-timeout "
                    "(attempt %d of %d)", rnd, len(ok), config.min_train_nodes, attempt + 1,
                    config.round_retries + 1)
    else:
        record.finalise()
        state.history.rounds.append(record)
        raise NotEnoughSitesError(
            f"round {rnd}: in {config.round_retries + 1} attempts, fewer than min-train-nodes "
            f"({config.min_train_nodes}) sites sent weights within round-timeout "
            f"({config.round_timeout:g} s); in the last, {len(ok)} of the {len(sent)} sites "
            "asked did, and the others' errors are in metrics.json; fix or restart those "
            "sites, raise round-timeout or round-retries, or lower min-train-nodes in the run "
            "config"
        )

    trained = expected_names(config, state.weights)
    ok = _reject_bad_updates(
        record, ok, {k: v for k, v in state.weights.items() if k in trained}, config)
    if (SITE_WEIGHTINGS[config.site_weighting].by_noise
            and CENTRAL_DP[config.central_dp].wrapper is None):
        # Flower's central-DP wrappers need equal weights, which the sites then send.
        ok = _weigh_by_noise(record, ok)
    _complete_updates(ok, state.weights)
    weights = state.weights
    if len(ok) >= config.min_train_nodes:
        arrays, _ = strategy.aggregate_train(rnd, ok)
        if arrays is not None:
            # The server's model keeps its own dtypes (float32): FedAdam's step, for
            # one, comes back in float64, which every site's next update would then miss.
            # Parameters outside dp-trainable keep their global values bit for bit,
            # whatever the strategy or its central-DP noise did to them.
            proposed = as_dtypes(merge_trainable(state.weights, from_record(arrays), trained),
                                 state.weights)
            problem = step_problem(state.weights, proposed, config.max_model_growth)
            if problem is None:
                weights = proposed
                record.aggregated = True
            else:
                record.step_refused = problem
                log.warning("round %d: keeping the previous global model: %s", rnd, problem)
    else:
        log.warning("round %d: %d of the required %d sites sent acceptable weights; keeping "
                    "the previous global model", rnd, len(ok), config.min_train_nodes)

    nodes = wait_for_nodes(grid, config.min_evaluate_nodes, config.node_wait_timeout,
                           clock.now, clock.sleep)
    chosen = choose_nodes(nodes, base.fraction_evaluate, config.min_evaluate_nodes,
                          f"{config.training.seed}:{rnd}:evaluate")
    started = clock.now()
    # The whole round config: a site that fine-tunes before evaluating needs the plan.
    eval_config = ConfigRecord(config.round_config(rnd))
    sent = _on_the_wire(_configure(strategy.configure_evaluate, rnd, weights, eval_config, grid,
                                   chosen), transfer)
    replies, _ = ask(grid, sent, _asking(rnd, "evaluate", record.retries), 0, _answered,
                     started + config.round_timeout, clock, state.late, on_late)
    record.evaluate_seconds = clock.now() - started
    _record_replies(record, sent, replies, "evaluate", known)
    record.finalise()
    state.history.rounds.append(record)
    return FederationState(server_round=rnd, weights=weights, history=state.history,
                           late=state.late)


def run_federation(grid: Grid, config: RunConfig, initial_weights: NDArrays,
                   folder: RunFolder, reporter: Reporter,
                   strategy: Strategy | None = None,
                   resumed: ResumeState | None = None,
                   clock: Clock = SYSTEM_CLOCK,
                   notes: Mapping[str, object] | None = None) -> FederationState:
    """Run all rounds, writing a checkpoint, the history and the resume state after each one.

    Parameters
    ----------
    grid : flwr.serverapp.Grid
        Connection to the sites.
    config : RunConfig
        The run's settings.
    initial_weights : dict of str to numpy.ndarray
        The global weights before round 1.
    folder : RunFolder
        Where the run is written.
    reporter : Reporter
        Receives each finished round.
    strategy : Strategy, optional
        The aggregation strategy; :func:`build_strategy` of ``config`` when omitted.
    resumed : ResumeState, optional
        A saved run to continue after its last round (``initial_weights`` then unused).
    clock : Clock
        Time source and sleep of the round deadlines (scripted in tests).
    notes : Mapping, optional
        Facts about the run's inputs recorded beside its run config in the history
        (the starting model's SHA-256).

    Returns
    -------
    FederationState
        The final state; the final model is at ``folder.final_model``.
    """
    strategy = strategy if strategy is not None else build_strategy(config)
    run_config = {**config.to_dict(), **(notes or {})}
    state = FederationState(0, initial_weights, MetricsHistory(run_config=run_config))
    if resumed is not None:
        run_config = {**resumed.history.run_config, **config.to_dict()}
        state = FederationState(resumed.server_round, resumed.weights, MetricsHistory(
            run_config=run_config, rounds=resumed.history.rounds))
        resumed.restore(strategy)
    while state.server_round < config.num_server_rounds:
        try:
            state = run_round(grid, strategy, config, state, clock)
        except NotEnoughSitesError:
            # The failed round's per-site errors; the resume state still points before it.
            state.history.write(folder)
            raise
        folder.save_round(state, config)
        # Last: a crash before it resumes at this round again, and the history it
        # holds is the one rewritten then, so every round is recorded once.
        folder.save_resume(state, config, strategy)
        reporter.round_finished(state.history.rounds[-1], config.num_server_rounds)
    if not any(r.aggregated for r in state.history.rounds):
        raise NotEnoughSitesError(
            f"no round of {config.num_server_rounds} received weights from min-train-nodes "
            f"({config.min_train_nodes}) sites, so no model was written; the per-site errors "
            f"are in {folder.metrics_json}"
        )
    folder.save_final(state, config)
    return state
