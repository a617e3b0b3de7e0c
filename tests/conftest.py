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


class FakeGrid:
    """A Grid whose sites are Python functions: message in, reply out (None: no reply)."""

    def __init__(self, responders: dict[int, Responder]) -> None:
        self.responders = responders
        self.sent: list[Message] = []

    def get_node_ids(self) -> Iterable[int]:
        return list(self.responders)

    def send_and_receive(self, messages: Iterable[Message], *,
                         timeout: float | None = None) -> Iterable[Message]:
        replies = []
        for msg in messages:
            # Flower's Grid gives each pushed message its id in place, as here.
            msg.metadata.__dict__["_message_id"] = msg.object_id
            self.sent.append(msg)
            reply = self.responders[msg.metadata.dst_node_id](msg)
            if reply is not None:
                replies.append(reply)
        return replies


def fingerprint_reply(msg: Message) -> Message:
    """Answer a planning round's fingerprint query as a 2D RGB site with thin structures."""
    from shared import protocol as p
    from shared.planning import Fingerprint

    fingerprint = Fingerprint(num_cases=20, spatial_dims=2, channels=3, shape=(16, 16),
                              spacing=(1.0, 1.0), has_spacing=False, foreground_fraction=0.1,
                              thickness=4.0, dark_fraction=0.3)
    return Message(RecordDict({p.FINGERPRINT: MetricRecord(dict(fingerprint.to_record()))}),
                   reply_to=msg)
