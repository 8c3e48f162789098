"""Size caps on incoming UCX messages, checked before a byte is received (issue 14 items 9 and 6): an oversized
notification is dropped without allocating its size, counted, and the link keeps working."""

from __future__ import annotations

import pytest

import kvxfer
from kvxfer.backends.ucx import UcxBackend

from .remote import RemoteAgent

pytestmark = [pytest.mark.ucx, pytest.mark.timeout(120)]


def test_an_oversized_notification_is_refused_before_it_is_received() -> None:
    backend = UcxBackend()
    with kvxfer.Agent("receiver", backends=[backend]) as agent:
        backend._responder.notification_nbytes = 1 << 20
        with RemoteAgent("sender") as sender:
            sender.call("connect", agent.metadata())
            sender.call("notify", b"x" * (8 << 20))  # rendezvous-sized: refused from its header alone
            sender.call("notify", b"small")
            notes = []
            for _ in range(50):
                notes += agent.notifications(timeout=0.1)
                if notes:
                    break
            assert [n.payload for n in notes] == [b"small"]
            assert backend.services.worker.inbox.refused == 1
            assert backend.services.worker.inbox.forms["rndv"] == 0  # nothing was received for the big one
            sender.call("notify", b"x" * (1 << 20) + b"")  # at the cap's edge (payload == cap): delivered
            delivered = []
            for _ in range(50):
                delivered += agent.notifications(timeout=0.1)
                if delivered:
                    break
            assert [len(n.payload) for n in delivered] == [1 << 20]
