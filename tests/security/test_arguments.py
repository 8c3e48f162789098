"""Bad arguments raise kvxfer errors at the call (issue 14 items 11, 12): never a foreign exception, never accepted."""

from __future__ import annotations

import math
import socket

import numpy as np
import pytest

import kvxfer
from kvxfer import ConfigError, RegistrationError, UsageError
from kvxfer.limits import Limits, check_timeout
from tests.helpers import agent_pair

BAD_TIMEOUTS = [-1, -0.5, "x", math.nan, math.inf, True, [1.0], b"1"]


@pytest.mark.parametrize("bad", BAD_TIMEOUTS)
def test_check_timeout_refuses_with_config_error(bad):
    with pytest.raises(ConfigError) as caught:
        check_timeout(bad)
    assert isinstance(caught.value, ValueError)


def test_check_timeout_accepts_numbers_and_none():
    assert check_timeout(None) is None
    assert check_timeout(0) == 0.0 and check_timeout(2.5) == 2.5
    with pytest.raises(ConfigError):
        check_timeout(None, allow_none=False)


@pytest.mark.parametrize("bad", BAD_TIMEOUTS)
def test_bad_timeouts_at_every_call(bad):
    source, destination, _, _, peer = agent_pair(4096)
    with source, destination:
        remote = peer.region("buf")
        local = destination.regions[0]
        plan = destination.plan(
            kvxfer.Descs.from_ranges(local, [0], 64), peer, kvxfer.Descs.from_ranges(remote, [0], 64)
        )
        for call in (
            lambda: destination.read(plan, timeout=bad),
            lambda: destination.write(plan, timeout=bad),
            lambda: destination.notifications(timeout=bad),
            lambda: destination.connect_to("127.0.0.1:1", timeout=bad),
        ):
            with pytest.raises(ConfigError):
                call()
        assert not destination._active, "a refused post must not leave a transfer (or a pinned region) behind"


def test_notifications_none_timeout_is_refused():
    with kvxfer.Agent("a", backends=["local"]) as agent:
        with pytest.raises(ConfigError):
            agent.notifications(timeout=None)


def test_closed_agent_refuses_notifications_and_subscribe():
    agent = kvxfer.Agent("a", backends=["local"])
    agent.close()
    with pytest.raises(UsageError):
        agent.notifications()
    with pytest.raises(UsageError):
        agent.subscribe(b"x", lambda note: None)
    with pytest.raises(UsageError):
        agent.connect_to("127.0.0.1:1")


def test_subscribe_needs_a_callable():
    with kvxfer.Agent("a", backends=["local"]) as agent:
        for bad in (None, 3, "f"):
            with pytest.raises(ConfigError, match="callable"):
                agent.subscribe(b"x", bad)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"compat": None}, "compat"),
        ({"compat": 3}, "compat"),
        ({"host_id": ""}, "host_id"),
        ({"token": "t"}, "needs listen"),
        ({"listen": "127.0.0.1:0", "token": ""}, "token"),
        ({"listen": 5}, "listen"),
        ({"timeouts": 3.0}, "timeouts"),
        ({"limits": {"notification_nbytes": 1}}, "limits"),
        ({"listen": "0.0.0.0:0"}, "allow_unauthenticated"),
    ],
)
def test_bad_agent_arguments(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        kvxfer.Agent("a", backends=["local"], **kwargs)


def test_listen_on_any_address_is_an_explicit_opt_in():
    with kvxfer.Agent("a", backends=["local"], listen="0.0.0.0:0", allow_unauthenticated=True) as agent:
        assert agent.listen_address.startswith("0.0.0.0:")
    with kvxfer.Agent("a", backends=["local"], listen="0.0.0.0:0", token="secret") as agent:
        assert agent.listen_address.startswith("0.0.0.0:")


def test_listen_on_a_port_in_use_or_an_address_not_ours_is_a_config_error():
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        with pytest.raises(ConfigError, match="cannot listen") as caught:
            kvxfer.Agent("a", backends=["local"], listen=f"127.0.0.1:{port}")
        assert isinstance(caught.value.__cause__, OSError)
    with pytest.raises(ConfigError, match="cannot listen"):
        kvxfer.Agent("a", backends=["local"], listen="192.0.2.1:0", token="t")  # TEST-NET-1: on no interface


@pytest.mark.parametrize(
    "field, value",
    [
        ("notification_nbytes", 0),
        ("queued_notifications", -1),
        ("side_channel_connections", 1.5),
        ("side_channel_request_seconds", 0),
        ("metadata_max_age", math.nan),
        ("queued_notification_nbytes", True),
    ],
)
def test_bad_limits(field, value):
    with pytest.raises(ConfigError, match=field):
        Limits(**{field: value})


def test_registering_the_same_buffer_twice_or_an_overlapping_view_is_refused():
    buffer = np.zeros(4096, np.uint8)
    with kvxfer.Agent("a", backends=["local"]) as agent:
        agent.register(buffer, name="whole")
        for overlapping in (buffer, buffer[1024:2048], buffer[4000:], buffer.view(np.uint32)):
            with pytest.raises(RegistrationError, match="overlaps region 'whole'"):
                agent.register(overlapping)
        assert [r.name for r in agent.regions] == ["whole"]
        neighbour = np.zeros(8192, np.uint8)
        agent.register(neighbour[4096:], name="apart")  # disjoint memory stays allowed
    with kvxfer.Agent("a", backends=["local"]) as first, kvxfer.Agent("b", backends=["local"]) as second:
        first.register(buffer)
        second.register(buffer)  # another agent may register it (e.g. a loopback test): each checks its own table


def test_descs_integer_index_out_of_range_is_an_index_error():
    with kvxfer.Agent("a", backends=["local"]) as agent:
        region = agent.register(np.zeros(256, np.uint8))
        descs = kvxfer.Descs.from_ranges(region, [0], 16)
        assert len(descs[0]) == 1 and len(descs[-1]) == 1
        for bad in (5, 1, -2, np.int64(7)):
            with pytest.raises(IndexError):
                descs[bad]
        three = kvxfer.Descs.from_ranges(region, [0, 16, 32], 16)
        assert int(three[-2].addr[0]) == int(three.addr[1]) and int(three[2].addr[0]) == int(three.addr[2])
