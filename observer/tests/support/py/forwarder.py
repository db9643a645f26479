"""A single-process userland TCP forwarder, as docker-proxy is: listens on LISTEN and, for every
connection it accepts, connects to TARGET and copies bytes both ways, with half-closes passed on.
One process, one thread (asyncio): no fork, so the accepting and the connecting sockets belong
to the same process. Prints one line, `forwarding LISTEN -> TARGET`, once it listens.

Usage: forwarder.py LISTEN_HOST:PORT TARGET_HOST:PORT
"""

import asyncio
import sys


def split(addr):
    host, port = addr.rsplit(":", 1)
    return host.strip("[]"), int(port)


async def pipe(reader, writer):
    try:
        while True:
            data = await reader.read(65536)
            if not data:
                break
            writer.write(data)
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()
    except (ConnectionError, OSError):
        writer.close()


async def main():
    listen, target = split(sys.argv[1]), split(sys.argv[2])

    async def serve(client_reader, client_writer):
        try:
            upstream_reader, upstream_writer = await asyncio.open_connection(*target)
        except OSError:
            client_writer.close()
            return
        await asyncio.gather(
            pipe(client_reader, upstream_writer), pipe(upstream_reader, client_writer)
        )
        upstream_writer.close()
        client_writer.close()

    server = await asyncio.start_server(serve, *listen, reuse_address=True)
    print(f"forwarding {sys.argv[1]} -> {sys.argv[2]}", flush=True)
    async with server:
        await server.serve_forever()


asyncio.run(main())
