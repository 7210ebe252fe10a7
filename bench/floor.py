"""The floor relay: the cheapest trio shape of "bytes in, bytes out", with no HTTP at all.

    python bench/floor.py --port LISTEN --upstream-port PORT [--host 127.0.0.1]

What any trio relay between a client and llama-server must at least spend on this
machine: the bench measures swapd's CPU per chunk as a ratio to this one's, in the same
run, on the same workload. Its own process, so its CPU comes from ``/proc`` like swapd's.

Shape, per accepted connection, **one trio task** and raw ``trio.socket`` calls:

1. one ``recv`` from the client: the whole request (a small POST arrives in one segment
   on loopback; nothing is parsed, so nothing checks that);
2. ``connect`` to the upstream, ``send`` those bytes;
3. ``recv`` from the upstream and ``send`` to the client, until the upstream closes (as
   llama-server does after every stream); then close both sockets.

Nothing is read from the client after the request, so this relays one exchange per
connection whose answer ends with the upstream closing: streams, not keep-alive requests.
TCP_NODELAY on both sockets, 64 KiB reads, ``listen(4096)`` as swapd does.
"""

from __future__ import annotations

import argparse
import contextlib
import socket
import sys

import trio

READ = 1 << 16


async def _send_all(sock: trio.socket.SocketType, data: bytes) -> None:
    view = memoryview(data)
    while view:
        sent = await sock.send(view)
        view = view[sent:]


async def relay(client: trio.socket.SocketType, upstream: tuple[str, int]) -> None:
    with client:
        try:
            request = await client.recv(READ)
            if not request:
                return
            up = trio.socket.socket()
            with up:
                up.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                await up.connect(upstream)
                await _send_all(up, request)
                while data := await up.recv(READ):
                    await _send_all(client, data)
        except OSError:
            return  # either side went away: drop the exchange


async def serve(host: str, port: int, upstream: tuple[str, int]) -> None:
    listener = trio.socket.socket()
    with listener:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        await listener.bind((host, port))
        listener.listen(4096)
        sys.stderr.write(f"floor relay listening on {host}:{listener.getsockname()[1]}\n")
        sys.stderr.flush()
        async with trio.open_nursery() as nursery:
            while True:
                client, _ = await listener.accept()
                client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                nursery.start_soon(relay, client, upstream)


def main() -> None:
    parser = argparse.ArgumentParser(prog="bench/floor.py", description=__doc__.split("\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream-host", default="127.0.0.1")
    parser.add_argument("--upstream-port", type=int, required=True)
    args = parser.parse_args()
    with contextlib.suppress(KeyboardInterrupt):
        trio.run(serve, args.host, args.port, (args.upstream_host, args.upstream_port))


if __name__ == "__main__":
    main()
