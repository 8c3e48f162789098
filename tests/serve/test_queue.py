"""PrefillQueue: order, bounds (backpressure), remove (abort), requeue once, token counts."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvxfer.errors import (
    ConfigError,
    KvxferError,
    QueueFullError,
    RequeueLimitError,
    UsageError,
)
from kvxfer.serve.queue import PrefillQueue


@dataclass(frozen=True)
class Item:
    request_id: str


@dataclass(frozen=True)
class Flight:  # the router's shape: the id is `rid`
    rid: str


def test_priority_classes_fifo_within() -> None:
    queue: PrefillQueue[Item] = PrefillQueue(10)
    for name, priority in [
        ("n1", "normal"),
        ("l1", "low"),
        ("h1", "high"),
        ("n2", "normal"),
        ("h2", "high"),
        ("l2", "low"),
    ]:
        queue.put(Item(name), priority, 10)  # type: ignore[arg-type]
    assert queue.by_priority() == {"high": 2, "normal": 2, "low": 2}
    assert [entry.request_id for entry in queue] == ["h1", "h2", "n1", "n2", "l1", "l2"]
    assert queue.peek() is not None and queue.peek().request_id == "h1"  # type: ignore[union-attr]
    popped = [queue.pop() for _ in range(6)]
    assert [item.request_id for item in popped if item] == ["h1", "h2", "n1", "n2", "l1", "l2"]
    assert queue.pop() is None and queue.peek() is None and len(queue) == 0 and queue.queued_tokens == 0


def test_bound_backpressure() -> None:
    queue: PrefillQueue[Item] = PrefillQueue(2)
    queue.put(Item("a"), "low", 5)
    queue.put(Item("b"), "low", 7)
    with pytest.raises(QueueFullError) as info:
        queue.put(Item("c"), "high", 1)
    assert isinstance(info.value, KvxferError) and (info.value.limit, info.value.size) == (2, 2)
    assert len(queue) == 2 and queue.queued_tokens == 12 and "c" not in queue
    queue.pop()
    queue.put(Item("c"), "high", 1)
    assert queue.pop() == Item("c")
    zero: PrefillQueue[Item] = PrefillQueue(0)
    with pytest.raises(QueueFullError):
        zero.put(Item("a"))


def test_remove_by_request_id() -> None:
    queue: PrefillQueue[Item] = PrefillQueue(5)
    for name in "abc":
        queue.put(Item(name), "normal", 100)
    assert queue.remove("b") == Item("b")
    assert queue.remove("b") is None and queue.remove("zzz") is None
    assert "b" not in queue and len(queue) == 2 and queue.queued_tokens == 200
    assert [queue.pop(), queue.pop()] == [Item("a"), Item("c")]


def test_requeue_once_at_the_head_of_its_class() -> None:
    queue: PrefillQueue[Item] = PrefillQueue(3)
    queue.put(Item("a"), "normal", 1)
    queue.put(Item("b"), "normal", 1)
    queue.put(Item("h"), "high", 1)
    victim = Item("v")
    queue.requeue(victim, "normal", 50)  # its prefill worker died; the queue is full but requeue has headroom
    assert len(queue) == 4 and queue.was_requeued("v") and queue.queued_tokens == 53
    assert [entry.request_id for entry in queue] == ["h", "v", "a", "b"]
    assert queue.pop() == Item("h") and queue.pop() == victim
    with pytest.raises(RequeueLimitError) as info:
        queue.requeue(victim, "normal", 50)
    assert info.value.request_id == "v" and "v" not in queue
    queue.release("v")  # the request ended: its record goes
    assert not queue.was_requeued("v")


def test_requeue_headroom_is_bounded_too() -> None:
    queue: PrefillQueue[Item] = PrefillQueue(1, requeue_headroom=1)
    queue.put(Item("a"))
    queue.requeue(Item("b"))
    with pytest.raises(QueueFullError):
        queue.requeue(Item("c"))
    assert len(queue) == 2


def test_requeue_memory_is_bounded() -> None:
    queue: PrefillQueue[Item] = PrefillQueue(10, max_requeue_memory=2)
    for name in "abc":
        queue.requeue(Item(name))
        queue.pop()
    assert [queue.was_requeued(name) for name in "abc"] == [False, True, True]


def test_duplicate_ids_bad_arguments_and_keys() -> None:
    queue: PrefillQueue[Item] = PrefillQueue(5)
    queue.put(Item("a"))
    with pytest.raises(UsageError, match="queued already"):
        queue.put(Item("a"))
    with pytest.raises(ConfigError, match="priority"):
        queue.put(Item("b"), "urgent")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="num_tokens"):
        queue.put(Item("b"), "low", -1)
    with pytest.raises(ConfigError, match="max_size"):
        PrefillQueue(-1)
    flights: PrefillQueue[Flight] = PrefillQueue(5)
    flights.put(Flight("r1"))
    assert flights.remove("r1") == Flight("r1")
    with pytest.raises(UsageError, match="no str request_id or rid"):
        flights.put(object())  # type: ignore[arg-type]
    keyed: PrefillQueue[tuple[str, int]] = PrefillQueue(5, key=lambda item: item[0])
    keyed.put(("x", 1), "low", 3)
    entry = keyed.pop_entry()
    assert entry is not None and (entry.request_id, entry.item, entry.priority, entry.num_tokens) == (
        "x",
        ("x", 1),
        "low",
        3,
    )


operations = st.lists(
    st.tuples(
        st.sampled_from(["put", "pop", "remove", "requeue"]),
        st.integers(0, 30),
        st.sampled_from(["high", "normal", "low"]),
        st.integers(0, 1000),
    ),
    max_size=120,
)


@settings(max_examples=200, deadline=None)
@given(max_size=st.integers(0, 8), headroom=st.integers(0, 4), ops=operations)
def test_queue_never_exceeds_its_bound_and_counts_stay_exact(
    max_size: int, headroom: int, ops: list[tuple[str, int, str, int]]
) -> None:
    queue: PrefillQueue[Item] = PrefillQueue(max_size, requeue_headroom=headroom)
    model: dict[str, int] = {}  # request id -> tokens, what must be queued
    for op, number, priority, tokens in ops:
        rid = f"r{number}"
        try:
            if op == "put":
                queue.put(Item(rid), priority, tokens)  # type: ignore[arg-type]
                model[rid] = tokens
            elif op == "requeue":
                queue.requeue(Item(rid), priority, tokens)  # type: ignore[arg-type]
                model[rid] = tokens
            elif op == "pop":
                item = queue.pop()
                if item is not None:
                    del model[item.request_id]
            else:
                removed = queue.remove(rid)
                assert (removed is not None) is (rid in model)
                model.pop(rid, None)
        except (QueueFullError, RequeueLimitError, UsageError):
            pass
        assert len(queue) <= max_size + headroom
        assert len(queue) == len(model) and queue.queued_tokens == sum(model.values())
        assert sum(queue.by_priority().values()) == len(queue)
