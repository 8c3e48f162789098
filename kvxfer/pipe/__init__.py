"""The KV pipe: one engine rank's paged KV cache <-> its peer ranks' caches (TP, block size, layout).

Rooms: :mod:`~kvxfer.pipe.kvpipe` (``KVPipe``), :mod:`~kvxfer.pipe.ranks` (which heads go where),
:mod:`~kvxfer.pipe.route` (strategy choice), :mod:`~kvxfer.pipe.request` (one pull or push),
:mod:`~kvxfer.pipe.strategies` (the steps of each strategy), :mod:`~kvxfer.pipe.launcher` (kernel launches),
:mod:`~kvxfer.pipe.staging` (the staging pool), :mod:`~kvxfer.pipe.steps`, :mod:`~kvxfer.pipe.handle`
(``PipeHandle``), :mod:`~kvxfer.pipe.watcher`, :mod:`~kvxfer.pipe.layer_board` (layer streaming),
:mod:`~kvxfer.pipe.lease` (block leases), :mod:`~kvxfer.pipe.checksum` (verify mode).
"""

from ..errors import LeaseLostError
from .checksum import Checksums
from .handle import LayerStream, PipeHandle
from .kvpipe import STRATEGIES, KVPipe
from .layer_board import LayerBoard
from .lease import Lease, Leases
from .ranks import HeadRoute, check_compatible, rank_pairs, route_heads
from .route import Route, Strategy

StreamingPush = LayerStream  # its former name

__all__ = [
    "STRATEGIES",
    "Checksums",
    "HeadRoute",
    "KVPipe",
    "LayerBoard",
    "LayerStream",
    "Lease",
    "LeaseLostError",
    "Leases",
    "PipeHandle",
    "Route",
    "Strategy",
    "StreamingPush",
    "check_compatible",
    "rank_pairs",
    "route_heads",
]
