"""Streams into a container through its host's p2prc port: what ``p2prc ssh`` (as OpenSSH's
ProxyCommand), Ansible runs and ``p2prc forward`` use, so that a host needs nothing open but
its p2prc port, and a host behind NAT is reached through its relay all the same.

asyncio, one thread: TLS inside a relay's TLS (``start_tls`` on a TLS stream) is safe only
where one thread drives both. Each path of the dial ladder is tried in order: direct
addresses, then relays; the host's key is checked on each, as everywhere.

OpenSSH starts ``python -m p2prc_core.tunnel`` (``helper_main``) for each connection it makes,
so this module imports at its top only what that helper uses: nothing of the CLI, the HTTP
client or the plugins. ``p2prc ssh`` and ``ssh-config`` keep one connection per container
(OpenSSH's ControlMaster, ``container_control_path``): only a first connection starts a helper.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import shlex
import ssl
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING

from p2prc_core import tls
from p2prc_core.errors import P2PRCError, PeerError, PeerRefused, unreachable
from p2prc_core.identity import NodeIdentity
from p2prc_core.models import Endpoint
from p2prc_core.signing import sign_request
from p2prc_core.upgrade_client import upgrade_async

if TYPE_CHECKING:
    from p2prc_core.my_containers import RemoteContainer

log = logging.getLogger("p2prc")

Streams = tuple[asyncio.StreamReader, asyncio.StreamWriter]
REUSE_SECONDS = 60  # an SSH connection left idle this long ends (OpenSSH's ControlPersist)


async def open_stream(endpoints: list[Endpoint], identity: NodeIdentity, path: str,
                      query: str, timeout: float, secure: bool = True
                      ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, bytes, Endpoint]:
    """A signed upgrade of ``path?query`` at the first path to the host that works; the
    streams, the stream's first bytes, and the path used.

    :raises PeerRefused: the host refused (no path would do better); PeerError: no path
        works (the message says which were tried and why).
    """
    failures = []
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
    reader, writer = await asyncio.open_connection(endpoint.host, endpoint.port, ssl=context,
                                                   server_hostname=hostname)
    try:
        if endpoint.relay:
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
                timeout: float, secure: bool) -> None:
    """The stream on standard input and output (OpenSSH's ProxyCommand)."""
    reader, writer, first, _ = await open_stream(endpoints, identity, path, query, timeout,
                                                 secure)
    _let_go_of_stderr()
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


def _let_go_of_stderr() -> None:
    """Point standard error at /dev/null once the stream is open: under ControlPersist the
    connection (and this helper) outlives the ``ssh`` that started it, and standard error
    may be its caller's pipe, which would then never close. What could go wrong was said by
    now; after this, ssh itself reports a connection that ends."""
    with contextlib.suppress(OSError):
        null = os.open(os.devnull, os.O_WRONLY)
        os.dup2(null, sys.stderr.fileno())
        os.close(null)


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


def helper_command(home: Path, container_id: str, port: int, paths: list[Endpoint],
                   timeout: float = 10.0, secure: bool = True) -> str:
    """The command line for OpenSSH's ProxyCommand (and Ansible's): this module itself
    (``python -m p2prc_core.tunnel``), given the host's ``paths``, which starts in a
    fraction of the time the whole CLI (``p2prc tunnel``) takes."""
    words = [sys.executable, "-m", "p2prc_core.tunnel", "--home", str(home),
             "--node", paths[0].node_id or "", "--timeout", f"{timeout:g}",
             *([] if secure else ["--plain"])]
    for path in paths:
        words += ["--path", path.path]
    return shlex.join([*words, container_id, str(port)])


def control_path(home: Path, name: str) -> Path:
    """The socket of an OpenSSH ControlMaster named ``name``: in the home's ``ssh`` folder
    (made private), unless that path is too long for a socket (OpenSSH adds 17 characters to
    it while it starts) or holds a ``%`` (which OpenSSH would expand): then in a private
    folder of this user's under the system's temporary folder.

    :raises P2PRCError: that folder is not this user's own.
    """
    folder = home / "ssh"
    path = folder / f"cm-{name}"
    if len(str(path)) + 17 < 100 and "%" not in str(path):
        _private_folder(folder)
        return path
    import tempfile

    short = Path(tempfile.gettempdir()) / f"p2prc-cm-{os.getuid()}"
    short.mkdir(mode=0o700, exist_ok=True)
    if short.stat().st_uid != os.getuid() or short.stat().st_mode & 0o077:
        raise P2PRCError(f"{short} is not this user's own folder: remove it, or give "
                         f"P2PRC_HOME a shorter path")
    return short / name


def _private_folder(folder: Path) -> None:
    """Make ``folder`` (and its parents), and take group and others off it: a ControlMaster
    socket in it logs in without a key."""
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    mode = folder.stat().st_mode
    if mode & 0o077:
        folder.chmod(mode & 0o700)


def container_control_path(home: Path, container_id: str, host_key: str) -> Path:
    """The one SSH connection to a container that ``p2prc ssh``, ``ssh-config``'s entries
    and ``p2prc run`` share: named by the container and the host key it was checked against
    (a connection is only reused for the key it checked)."""
    key = hashlib.sha256(host_key.encode()).hexdigest()[:8]
    return control_path(home, f"{container_id[:12]}-{key}")


def reuse_options(control: Path) -> list[str]:
    """ssh's options to share one connection at ``control``, kept ``REUSE_SECONDS`` after
    its last session ends: later connections start no helper and make no handshake."""
    return ["-o", "ControlMaster=auto", "-o", f"ControlPath={control}",
            "-o", f"ControlPersist={REUSE_SECONDS}"]


def helper_home(command: str) -> Path | None:
    """The home a ``helper_command`` line works in; None for any other command. (A runner
    handed the ProxyCommand puts the container's shared connection in that home.)"""
    try:
        words = shlex.split(command)
    except ValueError:
        return None
    if words[1:3] != ["-m", "p2prc_core.tunnel"] or "--home" not in words[:-3]:
        return None
    return Path(words[words.index("--home") + 1])


def current_paths(home: Path, node_id: str) -> list[Endpoint]:
    """Where the host ``node_id`` answers now, as this node's table holds it: the path that
    answered last, then its record's addresses and relays. An ``ssh-config`` entry is written
    once and used for weeks; the host may have moved behind a relay since. (The record's own
    order stands in for ``p2prc_select_address``'s: loading plugins would cost this helper
    more than a connection does.)"""
    from p2prc_core.addresses import dial_endpoints
    from p2prc_core.config import ConfigError, load_settings
    from p2prc_core.peertable import PeerTable

    try:
        settings = load_settings(home).settings
        table = PeerTable(home, allow_loopback=settings.allow_loopback)
        entry = table.load().get(node_id) if table.path.exists() else None
    except (ConfigError, OSError, ValueError):
        return []  # the paths written in the command still stand
    if entry is None:
        return []
    found = dial_endpoints(None, table.dial_addresses(entry.record), entry.port,
                           entry.measured.address, node_id, table.relays(entry.record))
    last = [e for e in found if e.path == entry.measured.address]
    return last + [e for e in found if e not in last]


def helper_main(argv: list[str] | None = None) -> int:
    """``python -m p2prc_core.tunnel --home H --node ID --path P [--path P ...] CONTAINER
    PORT``: the stream on standard input and output, through the paths given to the host
    ``ID``. Errors are one line on standard error (OpenSSH shows it)."""
    import argparse

    from p2prc_core.models import parse_path

    parser = argparse.ArgumentParser(prog="p2prc-tunnel")
    parser.add_argument("--home", type=Path, required=True)
    parser.add_argument("--node", required=True)
    parser.add_argument("--path", action="append", required=True)
    parser.add_argument("--timeout", type=float, default=10.0)
    parser.add_argument("--plain", action="store_true")
    parser.add_argument("container")
    parser.add_argument("port", type=int)
    args = parser.parse_args(argv)
    try:
        identity = NodeIdentity.load_or_create(args.home)
        written = [parse_path(p, args.node or None) for p in args.path]
        endpoints = current_paths(args.home, args.node) if args.node else []
        endpoints += [e for e in written if e not in endpoints]
        asyncio.run(stdio(endpoints, identity, f"/v1/containers/{args.container}/tunnel",
                          f"port={args.port}", args.timeout, not args.plain))
    except (PeerError, ValueError, OSError) as err:
        _say(f"p2prc tunnel: {err}")
        return 255
    except KeyboardInterrupt:
        return 130
    return 0


def _say(line: str) -> None:
    """One line on standard error, where OpenSSH shows it; under ControlPersist OpenSSH
    points a ProxyCommand's standard error at /dev/null, so there the line goes to the
    terminal, if there is one."""
    print(line, file=sys.stderr, flush=True)
    with contextlib.suppress(OSError):
        if os.path.samestat(os.fstat(sys.stderr.fileno()), os.stat(os.devnull)):
            with open("/dev/tty", "w") as terminal:
                print(line, file=terminal)


def ssh_command(home: Path, entry: RemoteContainer, private_key: Path,
                tunnel: bool = True, paths: list[Endpoint] | None = None,
                timeout: float = 10.0, secure: bool = True) -> list[str]:
    """ssh with the container's host key pinned, in a known_hosts file of its own: no prompt,
    no trust on first use. The key came over the channel to its host, checked by node id.
    Through the tunnel, the host key is pinned under an alias (``p2prc-ID``), and one
    connection is shared by every ssh into the container (``container_control_path``)."""
    from p2prc_core.sshkeys import known_hosts_line

    known = home / "ssh" / f"known_hosts_{entry.short_id}"
    known.parent.mkdir(parents=True, exist_ok=True)
    common = ["-i", str(private_key), "-o", f"UserKnownHostsFile={known}",
              "-o", "StrictHostKeyChecking=yes", "-o", "IdentitiesOnly=yes",
              "-o", "LogLevel=ERROR"]
    alias = f"p2prc-{entry.short_id}"
    known.write_text(f"{alias} {entry.host_key}\n"
                     + known_hosts_line(entry.host, entry.ssh_port, entry.host_key))
    if tunnel:
        # Keepalives: a relay on the way closes a stream idle for relay_idle_seconds.
        control = container_control_path(home, entry.id, entry.host_key)
        return ["ssh", *common, "-o", f"HostKeyAlias={alias}", "-o", "ServerAliveInterval=60",
                *reuse_options(control), "-o", "ProxyCommand=" + helper_command(
                    home, entry.id, 22, paths or [entry.host_endpoint], timeout, secure),
                f"root@{alias}"]
    return ["ssh", *common, "-p", str(entry.ssh_port), f"root@{entry.host}"]


if __name__ == "__main__":
    sys.exit(helper_main())
