"""Which sites a phase asks, how long it waits for them, and which replies count.

Flower's strategies sample sites with ``sample_nodes``, which waits without a
deadline until enough sites are connected: a site that vanishes between the
coordinator's own wait and that call would hang the run. So the coordinator
samples here, from one snapshot of the connected sites, and shows the strategy
only the sites it chose (:class:`ChosenSites`): the strategy still builds the
messages (FedProx's ``proximal-mu``, FedAdam's current arrays, the central-DP
wrappers' clipping norm) but has nothing left to wait for.

Replies are pulled until every site asked has answered or the phase's deadline
has passed, whichever is first; a phase that can no longer reach its minimum
stops at once. A reply that arrives after its deadline is *late*: it is
recognised by the id of the message it answers, recorded against its round, and
never aggregated. The decisions are pure functions (:func:`choose_nodes`,
:func:`phase_decision`); :func:`ask` is the thin loop around Flower's Grid.
"""

from __future__ import annotations

import enum
import logging
import math
import random
import time
from collections.abc import Callable, Iterable, MutableMapping, Sequence
from dataclasses import dataclass

from flwr.app import Message
from flwr.serverapp import Grid

log = logging.getLogger("fedseg.server")

#: Shortest and longest wait between two pulls of replies, in seconds.
POLL_MIN_SECONDS = 0.02
POLL_MAX_SECONDS = 1.0
#: The wait between pulls as a share of the time the phase has waited so far.
POLL_SHARE = 0.05


@dataclass(frozen=True)
class Clock:
    """Where the coordinator reads the time and waits; tests pass a scripted one."""

    now: Callable[[], float] = time.monotonic
    sleep: Callable[[float], None] = time.sleep


SYSTEM_CLOCK = Clock()


def choose_nodes(connected: Iterable[int], fraction: float, minimum: int, seed: str) -> list[int]:
    """Return the sites a phase asks, sorted: ``fraction`` of those connected, at least ``minimum``.

    The rule is Flower's (``int(n * fraction)``, raised to the minimum); the
    sample is drawn from a generator seeded by ``seed`` alone, so it neither
    depends on nor disturbs the global random state. Fewer connected sites than
    ``minimum`` gives all of them; waiting for more is the caller's business.
    """
    nodes = sorted(set(connected))
    size = min(len(nodes), max(math.floor(len(nodes) * fraction), minimum))
    if size == len(nodes):
        return nodes
    return sorted(random.Random(seed).sample(nodes, size))


class Decision(enum.Enum):
    """What a phase does after a pull of replies."""

    WAIT = "wait"          # sites are still working and the deadline has not passed
    PROCEED = "proceed"    # the phase goes on with the replies it has
    SHORT = "short"        # it cannot reach its minimum: retry the round or stop


def phase_decision(now: float, deadline: float, asked: int, replied: int, usable: int,
                   minimum: int) -> Decision:
    """Say whether a phase waits, goes on, or has fallen short of its minimum.

    Parameters
    ----------
    now, deadline : float
        The clock now and the phase's deadline, in the same seconds.
    asked : int
        Sites the phase sent a message to.
    replied : int
        Sites that answered in time, with anything (an error too).
    usable : int
        Of those, answers that count towards ``minimum`` (weights, for training).
    minimum : int
        Usable answers the phase needs (``min-train-nodes``; 0: none).

    Returns
    -------
    Decision
        ``PROCEED`` once every site answered or the deadline passed, with at least
        ``minimum`` usable answers; ``SHORT`` as soon as the answers still
        possible cannot reach ``minimum``; ``WAIT`` otherwise.
    """
    outstanding = asked - replied
    if usable + outstanding < minimum:
        return Decision.SHORT
    if outstanding == 0 or now >= deadline:
        return Decision.PROCEED if usable >= minimum else Decision.SHORT
    return Decision.WAIT


@dataclass(frozen=True)
class Asked:
    """One message a phase sent: what a reply to it belongs to."""

    server_round: int
    phase: str
    attempt: int
    node_id: int


class ChosenSites:
    """The Grid as a strategy sees it while building messages: only the chosen sites.

    With the strategy's own minimums at 1 and its fraction at 1 (see
    :func:`server.strategies.build_base_strategy`), Flower's ``sample_nodes``
    then returns exactly these sites without waiting. Anything else is the real
    Grid's.
    """

    def __init__(self, grid: Grid, nodes: Sequence[int]) -> None:
        self._grid = grid
        self._nodes = list(nodes)

    def get_node_ids(self) -> Iterable[int]:
        """Return the chosen sites."""
        return list(self._nodes)

    def __getattr__(self, name: str) -> object:
        return getattr(self._grid, name)


LateHandler = Callable[[Asked, Message], None]


def ask(grid: Grid, messages: Sequence[Message], asked_for: Callable[[Message], Asked],
        minimum: int, usable: Callable[[Message], bool], deadline: float, clock: Clock,
        late: MutableMapping[str, Asked], on_late: LateHandler) -> tuple[list[Message], Decision]:
    """Push ``messages`` and pull replies until :func:`phase_decision` stops waiting.

    Parameters
    ----------
    grid : flwr.serverapp.Grid
        Connection to the sites.
    messages : sequence of Message
        This phase's messages, one per site.
    asked_for : callable
        What each message is (round, phase, attempt, site), for its late reply.
    minimum : int
        Usable replies the phase needs.
    usable : callable
        Whether a reply counts towards ``minimum``.
    deadline : float
        The phase's deadline on ``clock``.
    clock : Clock
        Time source and sleep.
    late : mutable mapping of str to Asked
        Messages of earlier phases still unanswered, by message id. Replies to them
        are pulled along with this phase's and handed to ``on_late``; this phase's
        unanswered messages are added when it ends.
    on_late : callable
        Records a late reply; it is never returned, so never aggregated.

    Returns
    -------
    list of Message, Decision
        The replies that came in time, and whether the phase may go on.
    """
    started = clock.now()
    accepted = set(grid.push_messages(messages))
    # The Grid sets each message's id in place; one it did not accept gets no reply.
    waiting: dict[str, Asked] = {}
    for msg in messages:
        if msg.metadata.message_id in accepted:
            waiting[msg.metadata.message_id] = asked_for(msg)
        else:
            log.warning("node %s: the SuperLink did not accept the message",
                        msg.metadata.dst_node_id)
    total = len(waiting)
    replies: list[Message] = []
    while True:
        for reply in grid.pull_messages([*waiting, *late]):
            answered = reply.metadata.reply_to_message_id
            if answered in waiting:
                del waiting[answered]
                replies.append(reply)
            elif answered in late:
                on_late(late.pop(answered), reply)
        now = clock.now()
        decision = phase_decision(now, deadline, total, total - len(waiting),
                                  sum(1 for r in replies if usable(r)), minimum)
        if decision is not Decision.WAIT:
            break
        clock.sleep(min(poll_interval(now - started), deadline - now))
    late.update(waiting)
    return replies, decision


def poll_interval(waited: float) -> float:
    """Return how long to sleep before the next pull, after ``waited`` seconds in a phase.

    A fixed interval either adds up to a whole interval to every phase (a second a
    phase was a third of a short simulated round) or pulls many times a second
    through an hours-long deployed round. Waiting a fixed share of the time already
    waited bounds the delay a poll adds to that share of the phase, with few pulls.
    """
    return min(POLL_MAX_SECONDS, max(POLL_MIN_SECONDS, POLL_SHARE * waited))


def late_note(phase: str, reply: Message) -> str:
    """Return what the history says of a late reply in ``phase``."""
    if reply.has_error():
        return f"{phase}: error after round-timeout ({reply.error.reason})"
    return f"{phase}: late reply after round-timeout, not " + (
        "aggregated" if phase == "train" else "counted")


def no_reply_note(phase: str) -> str:
    """Return what the history says of a site that did not answer ``phase`` in time."""
    return f"{phase}: no reply within round-timeout"

