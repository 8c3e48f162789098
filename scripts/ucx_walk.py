"""Follow one ``Agent.read`` over the UCX backend (CPU, host memory, two agents in this process) and count the rooms
it crosses, per data path: the post (``Agent.read`` until it returns) and the wait (``handle.wait`` until the
transfer is final). Rooms and climbs back as in pull_walk.py; ``into backend.py from below``: calls into
``kvxfer.backends.ucx.backend`` made from another ucx module (its helpers calling back into the facade).

    python scripts/ucx_walk.py [--json] [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

import kvxfer

sys.path.insert(0, str(Path(__file__).resolve().parent))
from pull_walk import Walk, _summary

FACADE = "kvxfer.backends.ucx.backend"


class FacadeWalk(Walk):
    """A walk that also counts calls into the facade from the backend's other modules."""

    def __init__(self, start: Any) -> None:
        super().__init__(start)
        self.from_below = 0

    def hook(self, frame: Any, event: str, arg: Any) -> None:
        if event == "call" and self.active and self.room(frame) == FACADE:
            here = next((r for r in reversed(self.stack) if r is not None), None)
            if here is not None and here != FACADE and here.startswith("kvxfer.backends.ucx"):
                self.from_below += 1
        super().hook(frame, event, arg)


def _facade_summary(walk: FacadeWalk) -> dict[str, Any]:
    return {**_summary(walk), "into_backend_py_from_below": walk.from_below}


# path -> UcxConfig settings, fragments
PATHS: dict[str, tuple[dict[str, Any], int]] = {
    "cma": ({}, 64),
    "direct": ({"cma": "off", "stage_below": 0}, 64),
    "staged": ({"cma": "off"}, 256),
}


def run(path: str) -> dict[str, Any]:
    """Walk one READ along ``path``: the post, then the wait."""
    from kvxfer.backends.ucx import UcxBackend
    from kvxfer.backends.ucx.config import UcxConfig

    settings, fragments = PATHS[path]
    nbytes = 4096 * fragments * 2
    with (
        kvxfer.Agent("target", backends=[UcxBackend(UcxConfig(**settings))]) as target,
        kvxfer.Agent("reader", backends=[UcxBackend(UcxConfig(**settings))]) as reader,
    ):
        source = target.register(np.arange(nbytes, dtype=np.uint8), name="kv")
        local = reader.register(np.zeros(nbytes, dtype=np.uint8), name="kv")
        peer = reader.connect(target.metadata())
        offsets = np.arange(fragments, dtype=np.int64) * 8192
        plan = reader.plan(
            kvxfer.Descs.from_ranges(local, offsets, 4096),
            peer,
            kvxfer.Descs.from_ranges(peer.region("kv"), offsets, 4096),
        )
        assert source.nbytes == nbytes
        reader.read(plan).wait(10.0)  # warm: connections, caches
        post = FacadeWalk(kvxfer.Agent.read.__code__)
        sys.setprofile(post.hook)
        try:
            handle = reader.read(plan)
        finally:
            sys.setprofile(None)
        finish = FacadeWalk(type(handle).wait.__code__)
        sys.setprofile(finish.hook)
        try:
            handle.wait(10.0)
        finally:
            sys.setprofile(None)
        handle.release()
    return {"post": _facade_summary(post), "wait": _facade_summary(finish)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--repeats", type=int, default=5, help="walks per path; the longest is reported")
    args = parser.parse_args()
    results = {}
    for path in PATHS:
        runs = [run(path) for _ in range(args.repeats)]
        results[path] = {
            name: max(
                (r[name] for r in runs), key=lambda w: (w["climbs_back"], w["rooms"], w["into_backend_py_from_below"])
            )
            for name in ("post", "wait")
        }
    if args.json:
        print(json.dumps(results, indent=2))
        return
    for path, walks in results.items():
        for name, result in walks.items():
            ucx = [r for r in result["walk"] if r.startswith("kvxfer.backends.ucx")]
            print(
                f"{path} {name}: {result['rooms']} rooms ({len(ucx)} ucx), {result['climbs_back']} climbs back, "
                f"{result['into_backend_py_from_below']} calls into backend.py from below"
            )
            print(f"  walk: {' > '.join(r.removeprefix('kvxfer.') for r in result['walk'])}")
            for climb in result["climbs"]:
                print(f"  climb: {climb}")
            print(f"  re-entered: {result['reentered']}")


if __name__ == "__main__":
    main()
