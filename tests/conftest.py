"""Shared fixtures: fake Flower plumbing and paths to the optional real data."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import pytest
from flwr.app import Message, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity

REPO = Path(__file__).resolve().parents[1]
REAL_DATA = Path(os.environ.get("FEDSEG_REAL_DATA", REPO.parent / "shared" / "data"))


def real_data(sub: str) -> Path:
    """Return ``../shared/data/<sub>`` or skip the test with a visible reason."""
    path = REAL_DATA / sub
    if not path.is_dir():
        pytest.skip(f"real data not found at {path} (it sits beside the repository in CI)")
    return path


@pytest.fixture(autouse=True)
def _task_identity() -> Iterator[None]:
    """Give Message() the run/task identity Flower sets inside a real ServerApp."""
    TaskIdentity.run_id = 1
    TaskIdentity.task_id = 1
    TaskIdentity.node_id = 0
    yield


Responder = Callable[[Message], Message | None]
Delay = float | Callable[[Message], float]


class FakeTime:
    """A scripted clock for the coordinator's deadlines: ``sleep`` moves it on at once."""

    def __init__(self) -> None:
        self.now = 0.0

    def sleep(self, seconds: float) -> None:
        assert seconds >= 0, seconds
        self.now += seconds


class FakeGrid:
    """A Grid whose sites are Python functions: message in, reply out (None: no reply).

    ``delays`` gives a site's reply time in seconds of the scripted clock
    ``grid.clock`` (a number, or a function of the message): a reply is computed
    when its message is pushed and can be pulled once that time has passed.
    """

    def __init__(self, responders: dict[int, Responder],
                 delays: dict[int, Delay] | None = None) -> None:
        self.responders = responders
        self.delays = dict(delays or {})
        self.sent: list[Message] = []
        self.time = FakeTime()
        self._due: list[tuple[float, Message]] = []

    @property
    def clock(self):  # type: ignore[no-untyped-def]
        from server.deadline import Clock

        return Clock(lambda: self.time.now, self.time.sleep)

    def get_node_ids(self) -> Iterable[int]:
        return list(self.responders)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        for msg in messages:
            # Flower's Grid gives each pushed message its id in place, as here.
            msg.metadata.__dict__["_message_id"] = f"message-{len(self.sent) + 1}"
            self.sent.append(msg)
            ids.append(msg.metadata.message_id)
            reply = self.responders[msg.metadata.dst_node_id](msg)
            if reply is not None:
                delay = self.delays.get(msg.metadata.dst_node_id, 0.0)
                after = delay(msg) if callable(delay) else delay
                self._due.append((self.time.now + after, reply))
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        wanted = set(message_ids)
        out = [r for t, r in self._due
               if t <= self.time.now and r.metadata.reply_to_message_id in wanted]
        self._due = [(t, r) for t, r in self._due if not any(r is o for o in out)]
        return out

    def send_and_receive(self, messages: Iterable[Message], *,
                         timeout: float | None = None) -> Iterable[Message]:
        ids = list(self.push_messages(messages))
        # Flower's loop: everything due within the timeout, with no time passing here.
        limit = self.time.now + (timeout or 0.0)
        out = [r for t, r in self._due if t <= limit and r.metadata.reply_to_message_id in ids]
        self._due = [(t, r) for t, r in self._due if not any(r is o for o in out)]
        return out


def fingerprint_reply(msg: Message) -> Message:
    """Answer a planning round's fingerprint query as a 2D RGB site with thin structures."""
    from shared import protocol as p
    from shared.planning import Fingerprint

    fingerprint = Fingerprint(num_cases=20, spatial_dims=2, channels=3, shape=(16, 16),
                              spacing=(1.0, 1.0), has_spacing=False, foreground_fraction=0.1,
                              thickness=4.0, dark_fraction=0.3)
    return Message(RecordDict({p.FINGERPRINT: MetricRecord(dict(fingerprint.to_record()))}),
                   reply_to=msg)
