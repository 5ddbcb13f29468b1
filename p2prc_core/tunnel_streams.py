"""Streams into a container through its host's p2prc port, with asyncio: ``p2prc forward``,
``p2prc exec``'s streams, and the tunnel helper's way through a relay (``tunnel`` has the
helper itself, and its quicker way for a direct path).

asyncio, one thread: TLS inside a relay's TLS (``start_tls`` on a TLS stream) is safe only
where one thread drives both. Each path of the dial ladder is tried in order: direct
addresses, then relays; the host's key is checked on each, as everywhere.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import ssl
import sys
from collections.abc import Awaitable, Callable

from p2prc_core import punched, tls
from p2prc_core.errors import PeerError, PeerRefused, unreachable
from p2prc_core.identity import NodeIdentity
from p2prc_core.models import Endpoint
from p2prc_core.signing import sign_request
from p2prc_core.upgrade_client import upgrade_async

log = logging.getLogger("p2prc")
# What a stream's reader holds before it stops reading the socket (asyncio's default is 64 KiB):
# bulk output (an exec's -o) then comes in a few large reads, not many small ones, which
# took a tenth off a 512 MiB fetch's time here (bench/bench_exec.py).
READ_LIMIT = 1 << 18


async def open_stream(endpoints: list[Endpoint], identity: NodeIdentity, path: str,
                      query: str, timeout: float, secure: bool = True,
                      tried: list[str] | None = None
                      ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, bytes, Endpoint]:
    """A signed upgrade of ``path?query`` at the first path to the host that works; the
    streams, the stream's first bytes, and the path used. ``tried``: why paths tried before
    (by the caller, another way) failed, to say with these.

    :raises PeerRefused: the host refused (no path would do better); PeerError: no path
        works (the message says which were tried and why).
    """
    failures = list(tried or [])
    for endpoint in endpoints:
        try:
            return await asyncio.wait_for(
                _open_one(endpoint, identity, path, query, timeout, secure), timeout)
        except PeerRefused as err:
            if not endpoint.relay or err.status not in (403, 404, 503, 504):
                raise
            failures.append(str(err))  # this relay does not carry the host (any more)
        except PeerError as err:
            if isinstance(err, tls.NodeMismatch) and endpoint.named:
                raise  # where the user said this node is: that is news, not a bad path
            failures.append(str(err))
        except (TimeoutError, OSError, ssl.SSLError) as err:
            failures.append(str(unreachable(endpoint, err, timeout)))
    raise PeerError("no path to the host works: " + "; ".join(failures))


async def _open_one(endpoint: Endpoint, identity: NodeIdentity, path: str, query: str,
                    timeout: float, secure: bool
                    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, bytes, Endpoint]:
    context = tls.client_context() if secure else None
    hostname = "" if secure else None
    direct = None
    if endpoint.relay and (paths := punched.current()) is not None:  # a punched path first
        direct = await asyncio.get_running_loop().run_in_executor(None, paths.socket_to,
                                                                  endpoint)
    if direct is not None:
        reader, writer = await asyncio.open_connection(sock=direct, ssl=context,
                                                       server_hostname=hostname,
                                                       limit=READ_LIMIT)
    else:
        reader, writer = await asyncio.open_connection(endpoint.host, endpoint.port,
                                                       ssl=context, server_hostname=hostname,
                                                       limit=READ_LIMIT)
    try:
        if endpoint.relay and direct is None:
            where = f"relay {endpoint.address}"
            if secure:
                tls.check_peer(writer.get_extra_info("ssl_object"), endpoint.relay, where)
            relay_query = f"node={endpoint.node_id}"
            signed = sign_request(identity, "POST", "/v1/relay/connect", relay_query, b"",
                                  endpoint.relay)
            leftover = await upgrade_async(reader, writer, where,
                                           f"/v1/relay/connect?{relay_query}",
                                           endpoint.address, signed, timeout)
            if leftover:
                raise PeerError(f"{where} sent bytes the host could not have sent yet")
            if secure:
                await writer.start_tls(tls.client_context(), server_hostname="")
        if secure:
            tls.check_peer(writer.get_extra_info("ssl_object"), endpoint.node_id, endpoint)
        headers = sign_request(identity, "POST", path, query, b"", endpoint.node_id or "")
        first = await upgrade_async(reader, writer, str(endpoint), f"{path}?{query}",
                                    endpoint.address, headers, timeout)
    except BaseException:
        writer.close()
        raise
    return reader, writer, first, endpoint


async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
               local_reader: asyncio.StreamReader,
               local_write: Callable[[bytes], Awaitable[None]], first: bytes = b"",
               linger: float = 1.0) -> None:
    """Carry bytes both ways until the far end closes, or the local end does (then what the
    far end still sends for ``linger`` seconds is delivered)."""
    async def inbound() -> None:
        if first:
            await local_write(first)
        while data := await reader.read(1 << 16):
            await local_write(data)

    async def outbound() -> None:
        while data := await local_reader.read(1 << 16):
            writer.write(data)
            await writer.drain()

    coming = asyncio.ensure_future(inbound())
    going = asyncio.ensure_future(outbound())
    try:
        done, _ = await asyncio.wait({coming, going}, return_when=asyncio.FIRST_COMPLETED)
        if going in done and not coming.done():
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(asyncio.shield(coming), linger)
        for task in done:
            with contextlib.suppress(ConnectionError, OSError, ssl.SSLError):
                task.result()
    finally:
        for task in (coming, going):
            task.cancel()
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()


async def stdio(endpoints: list[Endpoint], identity: NodeIdentity, path: str, query: str,
                timeout: float, secure: bool, opened: Callable[[], None] | None = None,
                tried: list[str] | None = None) -> None:
    """The stream on standard input and output (OpenSSH's ProxyCommand); ``opened`` runs
    once it is open. ``tried``: what failed before (see ``open_stream``)."""
    reader, writer, first, _ = await open_stream(endpoints, identity, path, query, timeout,
                                                 secure, tried)
    if opened is not None:
        opened()
    loop = asyncio.get_running_loop()
    local_reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(local_reader),
                                 os.fdopen(sys.stdin.fileno(), "rb", buffering=0))
    out = sys.stdout.fileno()

    async def local_write(data: bytes) -> None:
        view = memoryview(data)
        while view:
            try:
                written = os.write(out, view)
            except BlockingIOError:
                await asyncio.sleep(0.001)
                continue
            view = view[written:]

    await pipe(reader, writer, local_reader, local_write, first)


async def forward(endpoints: list[Endpoint], identity: NodeIdentity, path: str, query: str,
                  timeout: float, secure: bool, local_port: int,
                  ready: Callable[[int], None],
                  stop: asyncio.Event | None = None,
                  failed: Callable[[str], None] | None = None) -> None:
    """Listen on 127.0.0.1:``local_port`` (0: any free port) and carry each connection to
    the container through its own stream, until ``stop`` is set."""
    paths = list(endpoints)

    async def handle(local_reader: asyncio.StreamReader,
                     local_writer: asyncio.StreamWriter) -> None:
        try:
            reader, writer, first, used = await open_stream(paths, identity, path, query,
                                                            timeout, secure)
        except PeerError as err:
            (failed or log.warning)(f"a connection could not be forwarded: {err}")
            local_writer.close()
            return
        if used in paths and paths[0] != used:  # the path that worked goes first next time
            paths.remove(used)
            paths.insert(0, used)

        async def local_write(data: bytes) -> None:
            local_writer.write(data)
            await local_writer.drain()

        try:
            await pipe(reader, writer, local_reader, local_write, first)
        finally:
            local_writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", local_port)
    ready(server.sockets[0].getsockname()[1])
    async with server:
        if stop is None:
            await server.serve_forever()
        else:
            await stop.wait()
