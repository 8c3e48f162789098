"""Forged and replayed metadata never makes an agent touch memory it did not export (issue 14 items 3, 4).

Each attack runs in a child process, so a regression shows up as a failed child (e.g. killed by SIGSEGV), not as a
dead test run.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

PRELUDE = """
import dataclasses, sys
import numpy as np
import kvxfer
from kvxfer import DescriptorError, HandshakeError
from kvxfer.metadata import AgentMetadata

MiB = 1 << 20

def forge(meta_bytes, **changes):
    meta = AgentMetadata.decode(meta_bytes)
    region_changes = changes.pop("region", {})
    regions = tuple(dataclasses.replace(r, **region_changes) for r in meta.regions)
    return dataclasses.replace(meta, regions=regions, **changes).encode()

def refused(call, error, text):
    try:
        call()
    except error as caught:
        assert text in str(caught), caught
        return
    raise AssertionError(f"not refused: {text}")
"""


def _run(body: str, timeout: float = 120) -> str:
    code = PRELUDE + textwrap.dedent(body) + "\nprint('OK')\n"
    result = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=dict(os.environ, PYTHONPATH=ROOT),
        cwd=ROOT,
    )
    assert result.returncode == 0 and result.stdout.strip().endswith("OK"), (
        f"child exited {result.returncode}\n{result.stdout}\n{result.stderr}"
    )
    return result.stdout


def test_local_backend_checks_descriptors_against_what_the_target_registered():
    _run("""
        import kvxfer.agent
        kvxfer.agent.check_not_replayed = lambda meta, me: meta  # as if a forgery slipped past connect's check
        whole = np.zeros(2 * MiB, np.uint8)
        canary = whole[MiB:]
        canary[:] = 7
        secret = np.full(MiB, 9, np.uint8)
        with kvxfer.Agent("target", backends=["local"]) as target, \\
                kvxfer.Agent("initiator", backends=["local"]) as initiator:
            target.register(whole[:MiB], name="kv")
            source = initiator.register(np.full(8192, 1, np.uint8))
            real = target.metadata()
            for forged, offset in ((forge(real, region={"nbytes": 2 * MiB}), MiB),
                                   (forge(real, region={"addr": secret.ctypes.data}), 0),
                                   (forge(real, region={"addr": 4096, "nbytes": 2**40}), 0)):
                peer = initiator.connect(forged)
                remote = kvxfer.Descs.from_ranges(peer.region("kv"), [offset], 4096)
                plan = initiator.plan(kvxfer.Descs.from_ranges(source, [0], 4096), peer, remote)
                for post in (initiator.write, initiator.read):
                    refused(lambda: post(plan).wait(5), DescriptorError, "as it registered them")
            assert (canary == 7).all() and (secret == 9).all() and (source.as_numpy() == 1).all()
            # the genuine metadata still works, up to the last registered byte
            peer = initiator.connect(real)
            plan = initiator.plan(kvxfer.Descs.from_ranges(source, [0], 4096), peer,
                                  kvxfer.Descs.from_ranges(peer.region("kv"), [MiB - 4096], 4096))
            initiator.write(plan).wait(5)
            assert (whole[MiB - 4096:MiB] == 1).all() and (canary == 7).all()
    """)


def test_self_replay_with_another_name_and_uid_is_refused():
    _run("""
        unregistered = np.full(MiB, 5, np.uint8)
        with kvxfer.Agent("target", backends=["local"], listen="127.0.0.1:0") as target:
            region = target.register(np.zeros(MiB, np.uint8), name="kv")
            served = kvxfer.sidechannel.fetch_metadata(target.listen_address, None, 5)
            replays = [forge(served, name="evil", uid="0" * 32, region={"addr": unregistered.ctypes.data}),
                       forge(served, name="evil", uid="0" * 32),
                       forge(served, region={"addr": unregistered.ctypes.data}),        # its own uid
                       forge(served, region={"nbytes": 2 * MiB}),
                       forge(served, region={"name": "other"})]
            for replay in replays:
                refused(lambda: target.connect(replay), HandshakeError, "claims to come from this process")
            assert target.peers == {} and (unregistered == 5).all()
            assert target.connect(served).name == "target"  # an agent may still connect to itself
            with kvxfer.Agent("sibling", backends=["local"]) as sibling:  # and to another agent of its process
                sibling.register(np.zeros(64, np.uint8))
                assert target.connect(sibling.metadata()).name == "sibling"
                refused(lambda: target.connect(forge(sibling.metadata(), uid=target.uid)), HandshakeError,
                        "differ from agent")
                stale = sibling.metadata()
                sibling.register(np.zeros(64, np.uint8), name="later")  # backend info may change meanwhile
                peer = target.connect(stale)
                assert sorted(r.name for r in peer.regions) == ["later", "region0"]  # connected with the truth
            refused(lambda: target.connect(forge(served, uid="1" * 32)), HandshakeError, "no live agent")
    """)


@pytest.mark.ucx
def test_ucx_self_replay_is_refused_before_the_backend_sees_it():
    _run(
        """
        from kvxfer.backends.ucx import backend as ucx_backend
        connected = []
        original = ucx_backend.UcxBackend.connect
        ucx_backend.UcxBackend.connect = lambda self, peer: connected.append(peer.name) or original(self, peer)
        unregistered = np.full(MiB, 5, np.uint8)
        with kvxfer.Agent("target", backends=["ucx"], listen="127.0.0.1:0") as target:
            target.register(np.zeros(MiB, np.uint8), name="kv")
            served = kvxfer.sidechannel.fetch_metadata(target.listen_address, None, 5)
            # same host and pid; then a claimed other pid, with our own worker address
            for replay in (forge(served, name="evil", uid="0" * 32, region={"addr": unregistered.ctypes.data}),
                           forge(served, name="evil", uid="0" * 32, pid=1)):
                refused(lambda: target.connect(replay), HandshakeError, "claims to come from this process")
            assert connected == [] and (unregistered == 5).all()
    """,
        timeout=180,
    )
