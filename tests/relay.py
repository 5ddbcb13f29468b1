"""A TCP relay that holds every chunk for a while before passing it on: a slow link.

Usage: python relay.py LISTEN_PORT TARGET_HOST TARGET_PORT DELAY_MS
(The kernel here has no netem, so delay is added in user space.)
"""

import asyncio
import sys


async def pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
               delay: float) -> None:
    try:
        while data := await reader.read(65536):
            await asyncio.sleep(delay)
            writer.write(data)
            await writer.drain()
    except (ConnectionError, OSError):
        pass
    finally:
        writer.close()


async def main() -> None:
    listen, host, port, delay_ms = sys.argv[1:5]
    delay = int(delay_ms) / 1000

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(host, int(port))
        except OSError:
            writer.close()
            return
        await asyncio.gather(pump(reader, up_writer, delay), pump(up_reader, writer, delay))

    server = await asyncio.start_server(handle, host="::", port=int(listen))
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(main())
