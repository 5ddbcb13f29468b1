"""SSH into a container through its host's p2prc port: what ``p2prc ssh`` (as OpenSSH's
ProxyCommand) and Ansible runs use, so that a host needs nothing open but its p2prc port, and
a host behind NAT is reached through its relay all the same.

OpenSSH starts ``python -m p2prc_core.tunnel`` (``helper_main``) for each connection it makes,
so this module imports at its top only what that helper uses: nothing of the CLI, the HTTP
client, the plugins or asyncio. The helper tries the first path it was given the quick way
(``tunnel_direct``: blocking sockets); only when that does not work does it load the table
and asyncio (``tunnel_streams``) for every path the host has, relays included. ``p2prc ssh``
and ``ssh-config`` keep one connection per container (OpenSSH's ControlMaster,
``container_control_path``): only a first connection starts a helper.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shlex
import ssl
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from p2prc_core import tls
from p2prc_core.errors import P2PRCError, PeerError, PeerRefused, unreachable
from p2prc_core.identity import NodeIdentity
from p2prc_core.models import Endpoint

if TYPE_CHECKING:
    import argparse

    from p2prc_core.my_containers import RemoteContainer

REUSE_SECONDS = 60  # an SSH connection left idle this long ends (OpenSSH's ControlPersist)


def let_go_of_stderr() -> None:
    """Point standard error at /dev/null once the stream is open: under ControlPersist the
    connection (and this helper) outlives the ``ssh`` that started it, and standard error
    may be its caller's pipe, which would then never close. What could go wrong was said by
    now; after this, ssh itself reports a connection that ends."""
    with contextlib.suppress(OSError):
        null = os.open(os.devnull, os.O_WRONLY)
        os.dup2(null, sys.stderr.fileno())
        os.close(null)


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
    if settings.punch:  # a relay among the paths: a punched path to the host first
        from p2prc_core import punched
        from p2prc_core.identity import NodeIdentity

        punched.use(punched.PunchedPaths(home, NodeIdentity.load_or_create(home),
                                         settings.transport == "tls",
                                         settings.allow_loopback))
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
        _stdio(args, identity, written, f"/v1/containers/{args.container}/tunnel",
               f"port={args.port}")
    except (PeerError, ValueError, OSError) as err:
        _say(f"p2prc tunnel: {err}")
        return 255
    except KeyboardInterrupt:
        return 130
    return 0


def _stdio(args: argparse.Namespace, identity: NodeIdentity, written: list[Endpoint],
           path: str, query: str) -> None:
    """The stream on standard input and output: the quick way on the first path written (a
    direct one), else every path the table and the command know, the asyncio way.

    :raises PeerError: no path works, or the host refused.
    """
    secure, tried = not args.plain, []
    first = written[0] if written and not written[0].relay else None
    if first is not None:
        from p2prc_core import tunnel_direct

        try:
            sock = tunnel_direct.connect(first, args.timeout)
        except OSError:
            pass  # it may have moved: all paths, in the table's order, with the whole timeout
        else:
            try:
                sock, data = tunnel_direct.upgrade(sock, first, identity, path, query,
                                                   args.timeout, secure)
            except (PeerRefused, tls.NodeMismatch) as err:
                if isinstance(err, PeerRefused) or first.named:
                    raise  # as tunnel_streams.open_stream: no other path would do better
                tried.append(str(err))
            except PeerError as err:
                tried.append(str(err))
            except (TimeoutError, OSError, ssl.SSLError) as err:
                tried.append(str(unreachable(first, err, args.timeout)))
            else:
                let_go_of_stderr()
                tunnel_direct.carry(sock, data, sys.stdin.fileno(), sys.stdout.fileno())
                return
    endpoints = current_paths(args.home, args.node) if args.node else []
    endpoints += [e for e in written if e not in endpoints]
    if tried and first is not None:
        endpoints.remove(first)  # it answered, and not as it should: once is enough
    if not endpoints:
        raise PeerError("no path to the host works: " + "; ".join(tried))
    import asyncio

    from p2prc_core import tunnel_streams

    asyncio.run(tunnel_streams.stdio(endpoints, identity, path, query, args.timeout, secure,
                                     let_go_of_stderr, tried))


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
