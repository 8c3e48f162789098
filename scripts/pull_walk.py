"""Follow one ``KVPipe.pull`` (CPU, local backend) from the call to the kernel launch and count the rooms it crosses.

A room is a kvxfer module (the ``kvxfer.kernels`` package counts as one: the walk's destination). A climb back is a
call from room A into room B although A does not import B, not even through other rooms (``import_graph.py``'s
edges, lazy ones included): a callback or a duck-typed reach from a lower layer into a higher one. A call into a
backend from a room that knows the ``Backend`` contract, or into a subclass's override of a method declared in the
caller's room (``Handle.wait`` -> ``PipeHandle.poll``), is a dispatch, not a climb. Calls through
non-kvxfer code (numpy, the standard library) are transparent. The walk is the calling thread's, from entering
``pull`` to its return: the kernel is planned and launched (on the CPU: handed to the pipe's copy thread) or the
transfer posted by then.

    python scripts/pull_walk.py [--json]
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path
from types import FrameType
from typing import Any

import numpy as np

import kvxfer

sys.path.insert(0, str(Path(__file__).resolve().parent))
from import_graph import reaches

REACHES = reaches()


class Walk:
    """Rooms entered and climbs back, recorded by a profile hook."""

    def __init__(self, start: Any) -> None:
        self.start = start
        self.stack: list[str | None] = []
        self.rooms: list[str] = []
        self.climbs: list[tuple[str, str]] = []
        self.entries: Counter[str] = Counter()
        self.active = False

    @staticmethod
    def room(frame: FrameType) -> str | None:
        name = frame.f_globals.get("__name__", "")
        if not name.startswith("kvxfer"):
            return None
        return "kvxfer.kernels" if name.startswith("kvxfer.kernels") else name

    def hook(self, frame: FrameType, event: str, arg: Any) -> None:
        if event == "call":
            room = self.room(frame)
            if not self.active and frame.f_code is self.start:
                self.active = True
            if self.active and room is not None:
                here = next((r for r in reversed(self.stack) if r is not None), None)
                if room != here:
                    self.entries[room] += 1
                    if room not in self.rooms:
                        self.rooms.append(room)
                    if (
                        here is not None
                        and here != "kvxfer.kernels"
                        and not _reaches(here, room)
                        and not _overrides(frame, here)
                    ):
                        self.climbs.append((here, room))
            self.stack.append(room)
        elif event == "return" and self.stack:
            self.stack.pop()
            if self.active and not self.stack:
                self.active = False


def _reaches(caller: str, callee: str) -> bool:
    known = REACHES.get(caller, set())
    # a backend's methods are reached through the Backend contract: a dispatch, not a climb
    contract = callee.startswith("kvxfer.backends.") and "kvxfer.backends.base" in known | {caller}
    return callee in known or contract


def _overrides(frame: FrameType, caller: str) -> bool:
    """True when the callee is a method of ``self`` declared by a base class of the caller's room (a template
    method such as ``Handle.wait`` calling the subclass's ``poll``): dispatch, not a climb."""
    owner = frame.f_locals.get("self")
    name = frame.f_code.co_name
    return owner is not None and any(
        klass.__module__ == caller and name in vars(klass) for klass in type(owner).__mro__[1:]
    )


def run(strategy: str) -> dict[str, Any]:
    """Walk one pull with ``strategy`` forced; rooms, climbs and entries per room."""
    layers, blocks, dim = 2, 8, 4

    def make(block: int, layout: str) -> kvxfer.KVCacheSpec:
        return kvxfer.KVCacheSpec(
            num_layers=layers,
            num_blocks=blocks,
            block_size=block,
            num_kv_heads=2,
            head_dim=dim,
            dtype="float32",
            layout=layout,
        )

    prefill_spec = make(4, "HND")
    decode_spec = make(4 if strategy == "direct" else 2, "HND" if strategy == "direct" else "NHD")
    with kvxfer.Agent("p", backends=["local"]) as prefill, kvxfer.Agent("d", backends=["local"]) as decode:
        prefill.register(np.ones(prefill_spec.tensor_shape, np.float32), name="kv")
        decode.register(np.zeros(decode_spec.tensor_shape, np.float32), name="kv")
        peer = decode.connect(prefill.metadata())
        pipe = kvxfer.KVPipe(decode, decode_spec, peer, prefill_spec, strategy=strategy)
        local_ids = np.arange(4) if strategy != "direct" else np.arange(2)
        pipe.pull(local_ids, np.arange(2)).release()  # warm caches: the walk is the steady state
        walk = Walk(kvxfer.KVPipe.pull.__code__)
        sys.setprofile(walk.hook)
        try:
            handle = pipe.pull(local_ids, np.arange(2), notify=b"done")
        finally:
            sys.setprofile(None)
        finish = Walk(type(handle).wait.__code__)  # the rest of the request: steps chained, checks, notification
        sys.setprofile(finish.hook)
        try:
            handle.wait(5.0)
        finally:
            sys.setprofile(None)
        handle.release()
        pipe.close()
    return {"pull": _summary(walk), "wait": _summary(finish)}


def _summary(walk: Walk) -> dict[str, Any]:
    return {
        "rooms": len(walk.rooms),
        "climbs_back": len(walk.climbs),
        "walk": walk.rooms,
        "climbs": [f"{a} -> {b}" for a, b in walk.climbs],
        "reentered": {room: count for room, count in walk.entries.items() if count > 1},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--repeats", type=int, default=5, help="walks per strategy; the longest is reported")
    args = parser.parse_args()
    results = {}
    for strategy in ("kernel", "direct", "staged"):
        # threads race (the pipe's watcher may finish a request before the waiter does): keep the longest walks
        runs = [run(strategy) for _ in range(args.repeats)]
        results[strategy] = {
            name: max((r[name] for r in runs), key=lambda w: (w["climbs_back"], w["rooms"]))
            for name in ("pull", "wait")
        }
    if args.json:
        print(json.dumps(results, indent=2))
        return
    for strategy, walks in results.items():
        for name, result in walks.items():
            print(f"{strategy} {name}: {result['rooms']} rooms, {result['climbs_back']} climbs back")
            print(f"  walk: {' > '.join(r.removeprefix('kvxfer.') for r in result['walk'])}")
            for climb in result["climbs"]:
                print(f"  climb: {climb}")
            print(f"  re-entered: {result['reentered']}")


if __name__ == "__main__":
    main()
