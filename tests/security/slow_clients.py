"""A crowd of stalled side-channel clients, as a separate process: ``python -m tests.security.slow_clients HOST
PORT COUNT INTERVAL SECONDS``. Holds COUNT connections that each send one byte of a request every INTERVAL seconds
(and reconnect at the next tick when the server drops them) for SECONDS, then exits. Prints "ready" once all are
connected the first time, and at the end "reconnects N".
"""

from __future__ import annotations

import selectors
import socket
import sys
import time

from kvxfer.sidechannel import HELLO


def _open(host: str, port: int) -> socket.socket | None:
    try:
        sock = socket.create_connection((host, port), timeout=5)
    except OSError:
        return None
    sock.setblocking(False)
    return sock


def main(host: str, port: int, count: int, interval: float, seconds: float) -> None:
    selector = selectors.DefaultSelector()
    sent: dict[socket.socket, int] = {}
    for _ in range(count):
        sock = _open(host, port)
        if sock is not None:
            sent[sock] = 0
            selector.register(sock, selectors.EVENT_READ)
    print("ready", len(sent), flush=True)
    dropped, reconnects, end, next_drip = 0, 0, time.monotonic() + seconds, time.monotonic() + interval
    while time.monotonic() < end:
        for key, _ in selector.select(timeout=min(interval, 0.1)):
            sock = key.fileobj
            try:
                closed = sock.recv(4096) == b""
            except BlockingIOError:
                closed = False
            except OSError:
                closed = True
            if closed:
                selector.unregister(sock)
                sock.close()
                del sent[sock]
                dropped += 1
        if time.monotonic() >= next_drip:
            next_drip += interval
            for _ in range(dropped):  # come back at the next tick, as a slow-loris client does
                fresh = _open(host, port)
                if fresh is not None:
                    reconnects += 1
                    sent[fresh] = 0
                    selector.register(fresh, selectors.EVENT_READ)
            dropped = 0
            for sock, position in list(sent.items()):
                try:
                    sock.send(HELLO[position % len(HELLO) : position % len(HELLO) + 1])
                    sent[sock] = position + 1
                except OSError:
                    pass
    print("reconnects", reconnects, flush=True)
    for sock in sent:
        sock.close()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4]), float(sys.argv[5]))
