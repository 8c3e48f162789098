"""Notifications are bounded (issue 14 item 9): payload size and undrained queue capped, drops counted, clear
errors to a local sender; the sender's name comes from the connection, not from the message."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

import kvxfer
from kvxfer import ConfigError
from kvxfer.limits import Limits

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
KiB, MiB = 1 << 10, 1 << 20


def _pair(receiver_limits: Limits, sender_limits: Limits | None = None):
    receiver = kvxfer.Agent("receiver", backends=["local"], limits=receiver_limits)
    sender = kvxfer.Agent("sender", backends=["local"], limits=sender_limits)
    receiver.register(np.zeros(4096, np.uint8), name="kv")
    return receiver, sender, sender.connect(receiver.metadata())  # the receiver never connects to the sender


def test_oversized_notifications_are_dropped_and_counted():
    receiver, sender, peer = _pair(Limits(notification_nbytes=64 * KiB), Limits(notification_nbytes=64 * MiB))
    with receiver, sender:
        sender.notify(peer, b"a" * (64 * KiB))
        sender.notify(peer, b"b" * (64 * MiB))
        notes = receiver.notifications(timeout=1.0)
        assert [(n.peer_name, len(n.payload)) for n in notes] == [("sender", 64 * KiB)]
        assert receiver.dropped_notifications == {"oversized": 1}


def test_the_sender_gets_a_config_error_over_its_own_limit():
    receiver, sender, peer = _pair(Limits(), Limits(notification_nbytes=1 * KiB))
    with receiver, sender:
        with pytest.raises(ConfigError, match="notification_nbytes"):
            sender.notify(peer, bytes(1 * KiB + 1))
        remote = peer.region("kv")
        local = sender.register(np.zeros(4096, np.uint8))
        plan = sender.plan(kvxfer.Descs.from_ranges(local, [0], 64), peer, kvxfer.Descs.from_ranges(remote, [0], 64))
        with pytest.raises(ConfigError, match="notification_nbytes"):
            sender.write(plan, notify=bytes(2 * KiB))
        assert receiver.notifications() == []


def test_an_undrained_queue_is_bounded_by_count_and_bytes():
    receiver, sender, peer = _pair(Limits(queued_notifications=100, queued_notification_nbytes=8 * MiB))
    with receiver, sender:
        for i in range(1000):
            sender.notify(peer, i.to_bytes(4, "little") * (256 * KiB // 4))  # 1000 x 256 KiB = 250 MiB offered
        notes = receiver.notifications()
        assert len(notes) == 32 and sum(len(n.payload) for n in notes) == 8 * MiB  # the byte cap bit first
        assert [int.from_bytes(n.payload[:4], "little") for n in notes] == list(range(32))  # the oldest kept
        assert receiver.dropped_notifications == {"queue full": 1000 - 32}
        for i in range(150):
            sender.notify(peer, bytes([i % 256]))
        assert len(receiver.notifications()) == 100  # the count cap
        sender.notify(peer, b"after")
        assert [n.payload for n in receiver.notifications()] == [b"after"]  # draining makes room again


def test_subscribed_prefixes_bypass_the_queue_but_not_the_size_cap():
    receiver, sender, peer = _pair(
        Limits(notification_nbytes=1 * KiB, queued_notifications=1), Limits(notification_nbytes=4 * KiB)
    )
    seen = []
    with receiver, sender:
        receiver.subscribe(b"ctl:", lambda note: seen.append(len(note.payload)))
        for _ in range(5):
            sender.notify(peer, b"ctl:" + bytes(100))
        sender.notify(peer, b"ctl:" + bytes(2 * KiB))
        assert seen == [104] * 5 and receiver.dropped_notifications == {"oversized": 1}


def test_the_sender_name_is_the_sending_agent_not_a_claim_in_the_payload():
    receiver, sender, peer = _pair(Limits())
    with receiver, sender:
        sender.notify(peer, b"\x08receiver I am the receiver")
        (note,) = receiver.notifications(timeout=1.0)
        assert note.peer_name == "sender"


@pytest.mark.ucx
def test_a_flood_from_another_process_over_ucx_stays_bounded():
    code = textwrap.dedent(f"""
        import sys, kvxfer
        address = sys.stdin.readline().strip()
        with kvxfer.Agent("flooder", backends=["ucx"], limits=kvxfer.limits.Limits(notification_nbytes=8 << 20)) as a:
            peer = a.connect_to(address, timeout=30)
            for i in range(400):
                a.notify(peer, bytes([i % 251]) * ({MiB}))
            a.notify(peer, bytes(4 << 20))
            a.notify(peer, b"done")
            print("sent", flush=True)
            sys.stdin.readline()
    """)
    limits = Limits(notification_nbytes=2 * MiB, queued_notification_nbytes=16 * MiB)
    with kvxfer.Agent("receiver", backends=["ucx"], listen="127.0.0.1:0", limits=limits) as receiver:
        receiver.register(np.zeros(4096, np.uint8), name="kv")
        child = subprocess.Popen(
            [sys.executable, "-c", code],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=dict(os.environ, PYTHONPATH=ROOT),
            cwd=ROOT,
        )
        try:
            child.stdin.write(receiver.listen_address + "\n")
            child.stdin.flush()
            assert child.stdout.readline().strip() == "sent"
            dropped: dict[str, int] = {}
            for _ in range(200):  # every message arrives in order; wait until the last (tiny) one is queued
                dropped = receiver.dropped_notifications
                if sum(dropped.values()) >= 400 - 16 + 1:
                    break
                time.sleep(0.05)
            kept = receiver.notifications(timeout=1.0)
            assert sum(len(n.payload) for n in kept) <= 16 * MiB
            assert dropped.get("oversized") == 1 and dropped.get("queue full", 0) >= 400 - 16
            assert all(n.peer_name == "flooder" for n in kept)
        finally:
            child.stdin.close()
            child.wait(timeout=30)
            child.stdout.close()
