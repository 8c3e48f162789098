"""One pipe request (a pull or a push): what it moves, the steps that move it, and the work at its end."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import numpy as np

from ..backends.base import Op
from ..errors import ConfigError
from ..memory import Region
from . import checksum
from .checksum import Checksums
from .layer_board import LayerBoard
from .lease import Leases
from .route import Route, peer_names
from .steps import Step
from .strategies import StagedStep, Strategies


@dataclass
class PipeRequest:
    """``op`` (READ: pull, WRITE: push) of ``tokens[i]`` tokens per route ``routes[i]``: local blocks ``local``
    (int64[n], host), peer blocks ``remote`` (int64[m], host), layers ``layers`` (int64[k], host). At the end,
    ``expected`` checksums (by peer name) are verified and ``notify`` reaches every peer."""

    op: Op
    local: np.ndarray
    remote: np.ndarray
    tokens: list[int]
    notify: bytes | None
    layers: np.ndarray
    routes: list[Route]
    strategies: Strategies
    expected: dict[str, Checksums] | None = None
    lease: bytes | None = None
    stream_key: bytes | None = None
    staging: list[Region] = field(default_factory=list)

    @property
    def peers(self) -> list[str]:
        """Names of the request's peers, each once."""
        return peer_names(self.routes)

    @property
    def num_layers(self) -> int:
        """Layers of the local cache (ids of ``layers`` are below it)."""
        return self.strategies.spec.num_layers

    def steps(self, layers: np.ndarray) -> list[Step]:
        """Post the steps that move ``layers`` (int64[k], host) on every route."""
        made = [
            step
            for route, tokens in zip(self.routes, self.tokens, strict=True)
            for step in self.strategies.steps(self.op, route, self.local, self.remote, tokens, layers)
        ]
        self.staging.extend(step.staging for step in made if isinstance(step, StagedStep))
        return made

    def finish(self) -> None:
        """Every step is done: verify checksums (TransferError on mismatch), then notify every peer."""
        agent, region, spec = self.strategies.agent, self.strategies.region, self.strategies.spec
        for route, tokens in zip(self.routes, self.tokens, strict=True):
            wanted = (self.expected or {}).get(route.peer.name)
            if wanted is not None:
                actual = checksum.compute(
                    region,
                    spec,
                    self.local,
                    num_tokens=tokens,
                    unit_tokens=wanted.unit_tokens,
                    heads=route.heads.local_heads,
                    layers=self.layers,
                )
                checksum.verify(wanted, actual, route.peer.name)
        if self.notify is not None:
            for name in self.peers:
                agent.notify(name, self.notify)

    def end(self, listener: Callable[[list[int]], None] | None = None) -> None:
        """The request is final (done, failed or cancelled): stop listening for layers (only if ``listener``
        still listens, when given), release the lease, give the staging buffers back."""
        agent = self.strategies.agent
        if self.stream_key is not None:
            LayerBoard.of(agent).forget(self.stream_key, listener)
        if self.lease is not None:
            Leases.of(agent).drop(self.lease, release=True)
        self.strategies.staging.give_back(self.staging)


def decode_expected(expected: Mapping[str, Checksums | bytes] | None) -> dict[str, Checksums] | None:
    """``expected`` with encoded checksums decoded; ConfigError unless it maps peer names to checksums."""
    if expected is None:
        return None
    if not isinstance(expected, dict):
        raise ConfigError(f"expected must map peer names to Checksums, got {type(expected).__name__}")
    return {
        name: value if isinstance(value, Checksums) else Checksums.decode(value) for name, value in expected.items()
    }
