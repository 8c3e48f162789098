"""The CUDA IPC backend's mailbox protocol for notifications sent with the launch (CPU: real sockets, the CUDA
event wait replaced by a stand-in that answers as the event would)."""

from __future__ import annotations

import threading
import time
import uuid

import pytest

from kvxfer.backends.cuda_ipc.mailbox import Mailbox


class Receiver:
    """A mailbox whose event waits answer from ``outcomes`` (handle -> True / False / None) and that records
    delivered notifications."""

    def __init__(self, outcomes: dict[bytes, bool | None]) -> None:
        self.outcomes, self.notes, self.lost = outcomes, [], []
        self.arrived = threading.Condition()
        self.mailbox = Mailbox(
            uuid.uuid4().hex, self._note, lambda *lost: self.lost.append(lost), lambda _index: ([], []), self._await
        )

    def _await(self, handle: bytes, alive) -> bool | None:
        assert alive(), "the sender's connection should be open"
        return self.outcomes[handle]

    def _note(self, sender: str, payload: bytes) -> None:
        with self.arrived:
            self.notes.append((sender, payload))
            self.arrived.notify_all()

    def wait_for(self, count: int, timeout: float = 5.0) -> list:
        with self.arrived:
            self.arrived.wait_for(lambda: len(self.notes) >= count, timeout)
            return list(self.notes)


@pytest.fixture
def pair():
    outcomes: dict[bytes, bool | None] = {}
    receiver = Receiver(outcomes)
    sender = Mailbox(uuid.uuid4().hex, lambda *a: None, lambda *a: None, lambda _index: ([], []))
    sender.open(
        "receiver-uid", "receiver", receiver.mailbox.address, receiver.mailbox.secret, ("sender-uid", "sender"), 5.0
    )
    try:
        yield sender, receiver, outcomes
    finally:
        sender.close()
        receiver.mailbox.close()


def test_notes_whose_event_completed_are_delivered_at_once_and_in_order(pair) -> None:
    sender, receiver, outcomes = pair
    outcomes.update({b"e1": True, b"e2": True})
    sender.send_note_after("receiver-uid", b"e1", b"first", 1)
    sender.send_note("receiver-uid", b"plain")
    sender.send_note_after("receiver-uid", b"e2", b"second", 2)
    assert receiver.wait_for(3) == [("sender", b"first"), ("sender", b"plain"), ("sender", b"second")]
    sender.send_done("receiver-uid", 1)  # a completion message for a delivered note changes nothing
    time.sleep(0.2)
    assert len(receiver.notes) == 3


def test_a_note_whose_event_cannot_be_waited_on_waits_for_done_and_holds_later_ones(pair) -> None:
    sender, receiver, outcomes = pair
    outcomes.update({b"e1": None, b"e2": True})
    sender.send_note_after("receiver-uid", b"e1", b"held", 1)
    sender.send_note_after("receiver-uid", b"e2", b"after-held", 2)
    sender.send_note("receiver-uid", b"plain")
    time.sleep(0.3)
    assert receiver.notes == [], "delivered before the sender said the copy completed"
    sender.send_done("receiver-uid", 2)
    time.sleep(0.2)
    assert receiver.notes == [], "a later note overtook the held one"
    sender.send_done("receiver-uid", 1)
    assert receiver.wait_for(3) == [("sender", b"held"), ("sender", b"after-held"), ("sender", b"plain")]


def test_notes_of_failed_or_orphaned_copies_are_dropped(pair) -> None:
    sender, receiver, outcomes = pair
    outcomes.update({b"dead": False, b"held": None, b"ok": True})
    sender.send_note_after("receiver-uid", b"dead", b"sender-died", 1)  # the event says: never completes
    sender.send_note_after("receiver-uid", b"held", b"copy-failed", 2)
    sender.send_note_after("receiver-uid", b"ok", b"fine", 3)  # held behind 2, needs its own done
    sender.send_done("receiver-uid", 2, landed=False)
    sender.send_done("receiver-uid", 3)
    assert receiver.wait_for(1) == [("sender", b"fine")]
    time.sleep(0.2)
    assert receiver.notes == [("sender", b"fine")]
