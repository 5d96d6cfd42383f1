"""A TCP proxy on 127.0.0.1 that adds a fixed delay to every request, like an object store far away.

    python benchmarks/latency_proxy.py --port LISTEN --upstream PORT [--delay-ms 20]

Each client connection gets its own upstream connection. A client->server chunk that starts a request (the first on
the connection, or the first after the server has answered) waits `--delay-ms` before it is forwarded; the rest of
the request and every response byte pass at once. So each request pays the delay once, as a round trip to a far
store would, and concurrent requests on separate connections wait side by side, not in a queue. Connecting is not
delayed (HTTP clients keep their connections open). Runs until killed; prints "ready" once listening.
"""

from __future__ import annotations

import argparse
import asyncio

CHUNK = 256 * 1024


async def _pipe(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, answered: asyncio.Event, delay: float | None
) -> None:
    """Copy reader -> writer. delay given: the client side (wait before a request starts); else the server side."""
    try:
        new_request = True
        while data := await reader.read(CHUNK):
            if delay is not None:
                if answered.is_set():
                    answered.clear()
                    new_request = True
                if new_request:
                    await asyncio.sleep(delay)
                    new_request = False
            else:
                answered.set()
            writer.write(data)
            await writer.drain()
    except (ConnectionError, asyncio.IncompleteReadError):
        pass
    finally:
        writer.close()


async def _serve(port: int, upstream: int, delay: float) -> None:
    async def handle(client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        try:
            server_r, server_w = await asyncio.open_connection("127.0.0.1", upstream)
        except OSError:
            client_w.close()
            return
        answered = asyncio.Event()
        await asyncio.gather(
            _pipe(client_r, server_w, answered, delay), _pipe(server_r, client_w, answered, None)
        )

    server = await asyncio.start_server(handle, "127.0.0.1", port)
    print("ready", flush=True)
    async with server:
        await server.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True, help="port to listen on (127.0.0.1)")
    parser.add_argument("--upstream", type=int, required=True, help="port of the server on 127.0.0.1")
    parser.add_argument("--delay-ms", type=float, default=20.0, help="added delay per request")
    args = parser.parse_args()
    asyncio.run(_serve(args.port, args.upstream, args.delay_ms / 1000))


if __name__ == "__main__":
    main()
