"""The UCX backend's house rules (issue 13) and its small pure parts: no import cycle among its modules (type-only
and function-level imports included), nothing outside binding/ touches cffi's ``ffi`` / ``lib``, nothing below the
facade imports backend.py; the ledger's reply routing, the outbox, the waker, UCS status decoding."""

from __future__ import annotations

import ast
import importlib.util
import logging
import select
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from kvxfer.backends.ucx.binding import UCS_INPROGRESS, UCS_OK, pointer_status
from kvxfer.backends.ucx.ledger import Ledger
from kvxfer.backends.ucx.outbox import Outbox
from kvxfer.backends.ucx.paths import DataPath
from kvxfer.backends.ucx.waker import Waker
from kvxfer.backends.ucx.wire import Header, Kind, pack_notification, unpack_notification

REPO = Path(__file__).resolve().parents[3]
PACKAGE = REPO / "kvxfer" / "backends" / "ucx"
PREFIX = "kvxfer.backends.ucx"


def _import_graph() -> Any:
    spec = importlib.util.spec_from_file_location("import_graph", REPO / "scripts" / "import_graph.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_no_import_cycle_in_the_ucx_backend_even_counting_type_only_imports() -> None:
    graph = _import_graph()
    _runtime, every, _sizes = graph.graphs()
    ucx = {
        name: {t for t in targets if t.startswith(PREFIX)} for name, targets in every.items() if name.startswith(PREFIX)
    }
    assert len(ucx) > 20  # the walk saw the package
    assert graph.strongly_connected(ucx) == []


def test_only_the_facade_and_the_package_import_backend_py() -> None:
    _runtime, every, _sizes = _import_graph().graphs()
    importers = sorted(name for name, targets in every.items() if f"{PREFIX}.backend" in targets)
    assert importers == [PREFIX]


def test_nothing_outside_binding_touches_ffi_or_lib() -> None:
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if "binding" in path.relative_to(PACKAGE).parts:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and node.attr in {"ffi", "lib", "libc"}:
                found.append(f"{path.relative_to(REPO)}:{node.lineno} .{node.attr}")
            if isinstance(node, ast.ImportFrom) and node.module and node.module.endswith(("cdef", "cffi")):
                found.append(f"{path.relative_to(REPO)}:{node.lineno} from {node.module}")
    assert found == []


class _Staged:
    """Stands in for a staged transfer awaiting answers."""

    def __init__(self, transfer_id: int) -> None:
        self.id = transfer_id
        self.replies: list[tuple[Kind, int]] = []

    def advance(self) -> None:
        pass

    def halt(self) -> None:
        pass

    def fail(self, message: str, cause: BaseException | None = None) -> None:
        pass

    def placement(self, header: Header, length: int) -> int:
        return 0x1000 + length

    def on_reply(self, header: Header, data: Any) -> None:
        self.replies.append((header.kind, header.chunk))


class _Slots:
    def __init__(self) -> None:
        self.written_off: list[int] = []
        self.recovered: list[int] = []

    def write_off(self, slot: int) -> None:
        self.written_off.append(slot)

    def recover(self, slot: int) -> None:
        self.recovered.append(slot)


def test_the_ledger_routes_answers_to_their_transfer_and_late_ones_to_written_off_slots() -> None:
    ledger = Ledger()
    first, second = ledger.next_id(), ledger.next_id()
    assert second == first + 1
    staged = _Staged(first)
    ledger.add(staged)
    ledger.expect_replies(staged)
    ledger.route_reply(Header(Kind.ACK, first, 3), None)
    assert staged.replies == [(Kind.ACK, 3)]
    assert ledger.placement(Header(Kind.DATA, first, 0), 16) == 0x1010
    assert ledger.placement(Header(Kind.DATA, second, 0), 16) == 0  # unknown transfer: a pooled buffer
    slots = _Slots()
    ledger.abandon_slot(first, 4, slots, 0xBEEF)
    ledger.retire(staged)
    assert not ledger.active and not ledger.awaiting
    ledger.route_reply(Header(Kind.ACK, first, 3), None)  # retired: nobody hears it
    ledger.route_reply(Header(Kind.ACK, first, 4), None)  # the written-off slot's late answer
    ledger.route_reply(Header(Kind.ACK, first, 4), None)  # a second one recovers nothing more
    assert staged.replies == [(Kind.ACK, 3)]
    assert slots.written_off == [0xBEEF] and slots.recovered == [0xBEEF]


def test_the_outbox_runs_everything_queued_even_after_a_failure(caplog: pytest.LogCaptureFixture) -> None:
    outbox, ran = Outbox(), []
    outbox.post(lambda: ran.append(1))
    outbox.post(lambda: 1 / 0)  # type: ignore[func-returns-value]
    outbox.post(lambda: ran.append(3))
    assert outbox
    with caplog.at_level(logging.ERROR, logger="kvxfer.ucx"):
        outbox.flush()
    assert ran == [1, 3] and not outbox
    assert "callback failed" in caplog.text


def test_the_waker_signals_until_drained_and_closes_once() -> None:
    waker = Waker()
    assert waker.fd is not None
    fd = waker.fd
    assert select.select([fd], [], [], 0)[0] == []
    waker.wake()
    waker.wake()
    assert select.select([fd], [], [], 0)[0] == [fd]
    waker.drain()
    assert select.select([fd], [], [], 0)[0] == []
    waker.close()
    assert waker.fd is None
    waker.close()
    waker.wake()  # after close: nothing, no error


def test_ucs_status_pointers_decode() -> None:
    assert pointer_status(0) == UCS_OK
    assert pointer_status(0x7F00_0000_1000) == UCS_INPROGRESS  # a request
    assert pointer_status(2**64 - 16) == -16  # UCS_ERR_CANCELED
    assert pointer_status(2**64 - 100) == -100  # the lowest error (UCS_ERR_LAST)


def test_notifications_carry_their_sender() -> None:
    packed = pack_notification("prefill-0", b"req-42")
    assert unpack_notification(packed) == ("prefill-0", b"req-42")
    assert unpack_notification(pack_notification("x" * 5000, b""))[0] == "x" * 1024  # the name is capped
    with pytest.raises(ValueError):
        unpack_notification(packed[:1])
    with pytest.raises(ValueError):
        unpack_notification(np.frombuffer(b"\xff\x00abc", dtype=np.uint8))


def test_data_paths_read_as_their_names() -> None:
    assert [str(path) for path in DataPath] == ["cma", "staged", "direct"]
    assert DataPath("staged") is DataPath.STAGED
