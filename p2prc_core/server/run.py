"""Run the peer server under embedded gunicorn, on one dual-stack socket."""

from __future__ import annotations

import errno
import logging
import shutil
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

from gunicorn.app.base import BaseApplication

from p2prc_core import reach, tls, udp_probe
from p2prc_core.config import Settings
from p2prc_core.errors import P2PRCError
from p2prc_core.periodic import Periodic
from p2prc_core.plugins import make_plugin_manager
from p2prc_core.server import upgrade
from p2prc_core.server.app import create_app, worker_threads
from p2prc_core.server.front import FrontWorker
from p2prc_core.services import NodeServices
from p2prc_core.storage import close_shared_dbs

log = logging.getLogger("p2prc.server")
_UDP: list[socket.socket] = []  # the server's UDP socket (udp_probe), bound before the fork

ACCESS_LOG_FORMAT = '%(t)s %(h)s "%(r)s" %(s)s %(B)s bytes %(M)sms'


def bind_socket(host: str, port: int, backlog: int = 2048) -> socket.socket:
    """A listening TCP socket; ``::`` takes IPv6 and IPv4 at once, or IPv4 alone on a
    machine whose kernel has no IPv6 (booted with ``ipv6.disable=1``).

    :raises P2PRCError: the port is taken, or the address is not on this machine.
    """
    try:
        infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM,
                                   flags=socket.AI_PASSIVE)
        family, _, _, _, sockaddr = infos[0]
        sock = socket.socket(family, socket.SOCK_STREAM)
    except OSError as err:
        if host == "::":  # no IPv6 in this kernel at all
            log.warning("no IPv6 on this machine (%s): listening on IPv4 only", err)
            return bind_socket("0.0.0.0", port, backlog)
        reason = err.strerror if isinstance(err, socket.gaierror) else str(err)
        raise P2PRCError(f"cannot listen on {host!r}: {reason}") from None
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            # Dual stack: also accept IPv4 (as ::ffff:a.b.c.d) whatever the system default.
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.bind(sockaddr)
        sock.listen(backlog)
    except OSError as err:
        sock.close()
        shown = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        if err.errno == errno.EADDRINUSE:
            raise P2PRCError(f"port {port} is already in use on {shown}: stop the other "
                             f"server or choose another with --port") from None
        if err.errno == errno.EADDRNOTAVAIL:
            raise P2PRCError(f"cannot listen on {shown}: that address is not on this machine "
                             f"(see 'p2prc interfaces')") from None
        if err.errno == errno.EACCES:
            raise P2PRCError(f"cannot listen on {shown}: permission denied (ports below 1024 "
                             f"need root)") from None
        raise P2PRCError(f"cannot listen on {shown}: {err.strerror}") from None
    sock.set_inheritable(True)
    return sock


class PeerServer(BaseApplication):  # type: ignore[misc]
    """gunicorn, embedded: only known settings, the app built in each worker."""

    def __init__(self, settings: Settings, home: Path, sock: socket.socket,
                 app_factory: Callable[[Settings, Path], Any] | None = None):
        self.settings = settings
        self.home = home
        self.app_factory = app_factory or build_app
        self.fd = sock.detach()  # gunicorn takes the descriptor over
        super().__init__()

    def load_config(self) -> None:
        s = self.settings
        options: dict[str, Any] = {
            "bind": [f"fd://{self.fd}"],
            "workers": s.workers,
            # gthread, with request heads read in its event loop (see server.front)
            "worker_class": FrontWorker.configure(s.request_head_seconds,
                                                  s.connections_per_source,
                                                  s.request_timeout * 3),
            "threads": worker_threads(s),  # a relay's own on top
            "timeout": s.timeout,
            "graceful_timeout": 10,
            "keepalive": 5,
            "loglevel": s.log_level,
            "errorlog": "-",
            "accesslog": "-" if s.access_log else None,
            "access_log_format": ACCESS_LOG_FORMAT,
            "proc_name": f"p2prc-server:{s.port}",
            "limit_request_line": 8190,
            "control_socket_disable": True,  # gunicorn 24+: no shared socket in ~/.gunicorn
            "post_worker_init": lambda worker: upgrade.set_worker(worker),
            "worker_exit": lambda server, worker: reach.stop_all(),
        }
        if s.transport == "tls":
            options.update(tls_options(self.home, s.request_timeout * 3))
        for key, value in options.items():
            if key in self.cfg.settings:
                self.cfg.set(key, value)

    def load(self) -> Any:
        return self.app_factory(self.settings, self.home)


def raise_open_files() -> int:
    """Raise this process's (and its workers') limit of open descriptors to the most it may
    have; the limit now."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = hard if hard != resource.RLIM_INFINITY else 1 << 20
    if soft != resource.RLIM_INFINITY and soft < wanted:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
            soft = wanted
        except (ValueError, OSError):
            pass
    return soft


def tls_options(home: Path, socket_timeout: float) -> dict[str, Any]:
    """gunicorn's TLS settings: the node key and its certificate, TLS 1.3 only, one context
    for every connection (gunicorn's default builds one per connection), and a timeout on
    every connection's socket (gthread's threads have none of their own)."""
    from p2prc_core.identity import NodeIdentity

    cert, key = tls.server_files(home, NodeIdentity.load_or_create(home))
    context = tls.server_context(cert, key, socket_timeout)
    return {"certfile": str(cert), "keyfile": str(key),
            "ssl_context": lambda config, default_factory: context}


def start_background_jobs(node: NodeServices) -> list[Periodic]:
    """Reaping expired containers and refreshing the table from peers (then checking what
    this node's NAT does with UDP), each on its own interval; ``Periodic`` lets one worker
    at a time do a job that is due."""
    from p2prc_core.discovery import refresh_job
    from p2prc_core.doctor import udp_mapping

    def reap() -> list[str]:
        removed = node.hosting.reap()
        for container_id in removed:
            log.info("container %s expired and was removed", container_id[:12])
        return removed

    jobs = [Periodic(node.home, "reap", node.settings.reap_seconds, reap)]
    if node.settings.refresh_seconds:
        refresh = refresh_job(node.peers.discovery, node.settings.update_hops,
                              node.peers.bootstrap)

        def refresh_then_udp() -> Any:
            """The table refreshed, then its answering peers asked what this node's NAT
            does with UDP (``p2prc status`` shows it), then the table's rows kept for a
            listing (``PeerListing``)."""
            found = refresh()
            try:
                udp_mapping(node)
            except Exception:  # noqa: BLE001 - the refresh's result stands
                log.exception("the UDP check failed; trying again after the next refresh")
            try:
                node.peers.listing.keep()  # a long table's rows, ready for 'peers ls'
            except Exception:  # noqa: BLE001 - only a view; a listing makes it again
                log.exception("the table's rows could not be kept; 'peers ls' makes them")
            return found

        jobs.append(Periodic(node.home, "refresh", node.settings.refresh_seconds,
                             refresh_then_udp))
    for job in jobs:
        job.start()
    return jobs


def build_app(settings: Settings, home: Path) -> Any:
    """The peer app as each worker builds it (plugins are loaded again after the fork)."""
    node = NodeServices(settings, home, make_plugin_manager(disabled=settings.disable_plugins,
                                                           home=home))
    start_background_jobs(node)
    for udp in _UDP:  # one worker at a time serves it: probes, punches, QUIC
        from p2prc_core.addresses import own_server
        from p2prc_core.udp_endpoint import UdpOwner

        cert, key = tls.server_files(home, node.identity)
        UdpOwner(udp, home, node.identity, cert, key, settings.clock_window_seconds,
                 own_server(settings), settings.allow_loopback).start()
    reach.start(node.settings, node.home, node.peers)
    return upgrade.Upgrades(create_app(node))


def configure_logging(level: str) -> None:
    """p2prc's own log lines go to stderr beside gunicorn's, in the same shape."""
    logger = logging.getLogger("p2prc")
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("[%(asctime)s] [%(process)d] [%(levelname)s] "
                                               "%(name)s: %(message)s", "%Y-%m-%d %H:%M:%S %z"))
        logger.addHandler(handler)
    logger.setLevel(level.upper())


def serve(node: NodeServices, announce: Callable[[], None] | None = None) -> None:
    """Check the plugins, bind the socket, then hand over to gunicorn until a signal stops it.

    :param node: the node's services, built (plugins loaded and checked) before the fork, so
        a bad key or state file is one clear error, not a worker that fails to boot.
    :param announce: called once the socket is bound, before serving (the start-up line).
    """
    settings = node.settings
    configure_logging(settings.log_level)
    # Everything a worker opens is opened once here first, so that a bad key, trust file,
    # state database or table is one clear error now rather than "Worker failed to boot".
    _ = node.identity
    node.trust.all()
    node.state.invites()
    node.table.ensure()
    running = node.own.running_server()  # before anything of the running one is touched
    if running is not None:
        raise P2PRCError(f"a p2prc server already runs for this home ({node.home}): pid "
                         f"{running.pid}, port {running.port}; stop it first, or give "
                         f"this one another home (--home)")
    try:  # the leases are squared with what the engine runs
        changes = node.hosting.service().reconcile()
        if changes["adopted"] or changes["dropped"]:
            log.info("containers: %d found running again, %d gone since the last run",
                     len(changes["adopted"]), len(changes["dropped"]))
    except P2PRCError as err:
        log.warning("containers unavailable: %s", err)
    sock = bind_socket(settings.host, settings.port)
    udp = udp_probe.bind(settings.host, sock.getsockname()[1])
    _UDP[:] = [udp] if udp is not None else []
    if udp is None:
        log.warning("UDP port %d is taken or not allowed: peers cannot tell this node what "
                    "its NAT does with UDP (p2prc doctor)", sock.getsockname()[1])
    node.own.announce_server()  # commands run beside it learn its real port
    # Relay markers of a server that was killed (not stopped) would count forever.
    shutil.rmtree(node.home / "relay", ignore_errors=True)
    raise_open_files()  # a relay holds two descriptors for each node and stream end
    if announce:
        announce()
    try:
        # What the checks and the reconcile opened is closed before the fork: the workers
        # open their own, and would each hold a copy of these (a dozen sockets to the
        # engine, five descriptors of server.db) for as long as they live.
        node.hosting.let_go()
        close_shared_dbs()
        PeerServer(settings, node.home, sock).run()
    finally:
        node.hosting.drain_pool()  # nobody's containers: they go with the server
        node.own.withdraw_server()
