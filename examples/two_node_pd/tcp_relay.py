"""A TCP relay: ``python tcp_relay.py LISTEN_HOST:PORT TARGET_HOST:PORT``. Forwards every connection, both ways.

The fault tests put one between a worker and etcd: SIGSTOP on the relay cuts that worker off from etcd (its lease
lapses) while its control link to the router stays up; SIGCONT restores it. At most 64 connections at once.
"""

from __future__ import annotations

import socket
import sys
import threading

MAX_CONNECTIONS = 64


def _pipe(source: socket.socket, sink: socket.socket) -> None:
    try:
        while data := source.recv(65536):
            sink.sendall(data)
    except OSError:
        pass
    finally:
        for sock in (source, sink):
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


def serve(listen: tuple[str, int], target: tuple[str, int]) -> None:
    slots = threading.BoundedSemaphore(MAX_CONNECTIONS)
    with socket.create_server(listen) as server:
        print(f"relay {listen[0]}:{server.getsockname()[1]} -> {target[0]}:{target[1]}", flush=True)
        while True:
            client, _ = server.accept()
            if not slots.acquire(blocking=False):
                client.close()
                continue
            try:
                upstream = socket.create_connection(target, timeout=5.0)
                upstream.settimeout(None)
            except OSError:
                client.close()
                slots.release()
                continue

            def run(client: socket.socket = client, upstream: socket.socket = upstream) -> None:
                back = threading.Thread(target=_pipe, args=(upstream, client), daemon=True)
                back.start()
                _pipe(client, upstream)
                back.join()
                client.close()
                upstream.close()
                slots.release()

            threading.Thread(target=run, daemon=True).start()


def _address(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host, int(port)


if __name__ == "__main__":
    serve(_address(sys.argv[1]), _address(sys.argv[2]))
