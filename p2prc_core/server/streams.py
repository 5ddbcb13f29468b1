"""Routes that switch a connection to a byte stream (see ``upgrade``): a tunnel into one of
the caller's containers, and a relay's three routes. Plus the dial-back check, which tells a
node whether it can be dialled at all."""

from __future__ import annotations

import logging
import socket
import ssl
from collections.abc import Callable

import falcon

from p2prc_core import tls
from p2prc_core.containers import ContainerService
from p2prc_core.models import Address
from p2prc_core.server.bodies import read_json
from p2prc_core.server.resources import json_answer, send
from p2prc_core.server.upgrade import Held, Share, keep, serving, switch, wants_upgrade
from p2prc_core.splice import Spliced, no_delay, process_loop
from p2prc_core.wire import ReachAnswer

log = logging.getLogger("p2prc.server")

TUNNEL_IDLE_SECONDS = 3600.0  # a tunnel with no byte either way for this long is closed
TUNNELS_PER_WORKER = 256  # carried by a loop, not a thread each: a bound on descriptors
# (two each); one caller may hold half of them


def _dial_local(port: int, timeout: float = 5.0) -> socket.socket:
    """This host's own service on ``port`` (a container's published port), IPv4 or IPv6
    loopback."""
    last: OSError | None = None
    for host in ("127.0.0.1", "::1"):
        try:
            return no_delay(socket.create_connection((host, port), timeout=timeout))
        except OSError as err:
            last = err
    raise falcon.HTTPBadGateway(title="Container not answering",
                                description=f"Nothing answers on the container's port "
                                            f"({last}).")


class TunnelResource:
    """``POST /v1/containers/{id}/tunnel?port=N``: a stream to port N of one of the caller's
    containers (22, its sshd, by default), so that SSH, Ansible and forwarded services need
    nothing open on the host but its p2prc port."""

    AUTH = {"post": "signed"}
    OPENAPI = {"post": {
        "summary": "Switch to a byte stream joined to a port of one of the caller's containers",
        "tags": ["signed"],
        "parameters": [{"name": "port", "in": "query", "required": False,
                        "schema": {"type": "integer", "minimum": 1, "maximum": 65535},
                        "description": "the container's port (default 22, its sshd)"}],
        "responses": {"101": {"description": "the stream follows"},
                      "400": {"description": "not an upgrade, or a port the container "
                                             "does not have"},
                      "501": {"description": "this server cannot switch to a stream"},
                      "502": {"description": "nothing answers on the container's port"}},
    }}

    def __init__(self, service: Callable[[], ContainerService], held: Held):
        self.service = service
        self.held = held

    def on_post(self, req: falcon.Request, resp: falcon.Response, container_id: str) -> None:
        wants_upgrade(req)
        lease = self.service().find(container_id, req.context.caller)
        port = req.get_param_as_int("port", min_value=1, max_value=65535, default=22)
        external = {int(p["internal"]): int(p["external"]) for p in lease.ports}
        if port not in external:
            raise falcon.HTTPBadRequest(
                title="No such port",
                description=f"Container {lease.id[:12]} has ports "
                            f"{', '.join(str(p) for p in sorted(external))}, not {port}.")
        share = Share(f"caller {req.context.caller}", max(1, self.held.limit // 2))
        target, release = self.held.opening("a tunnel", lambda: _dial_local(external[port]),
                                            [share])
        log.info("tunnel to %s port %d for %s", lease.id[:12], port, req.context.caller)
        switch(req, resp, lambda sock: _carry(sock, target, release), release)


def _carry(sock: socket.socket, target: socket.socket, release: Callable[[], None]) -> bool:
    """Hand a tunnel's two ends to this worker's loop, which joins them (``SpliceLoop``):
    a tunnel holds no thread, so SSH sessions kept open (ControlPersist, VS Code) do not
    take the threads that requests need. ``release`` once it ends."""
    for each in (sock, target):
        no_delay(each)

    def finished(done: Spliced) -> None:
        log.debug("tunnel closed (%s): %d bytes in, %d out", done.reason, done.a_to_b,
                  done.b_to_a)
        release()

    try:
        process_loop("p2prc-tunnels").carry(sock, target, idle_seconds=TUNNEL_IDLE_SECONDS,
                                            alive=serving, finished=finished)
    except BaseException:  # not the loop's: the container's end is closed here, the
        target.close()  # caller's by gunicorn, and the slot given back by switch
        raise
    keep(sock)  # the loop's now: gunicorn must not close it
    return True


class ReachCheckResource:
    """``POST /v1/reach``: dial the caller back, at the address its request came from and the
    port it names, and say whether its server answered there as itself. Only that address
    is ever dialled, once, with a short timeout: nobody can aim this at a third host."""

    AUTH = {"post": "signed"}
    OPENAPI = {"post": {
        "summary": "Dial the caller back: can its server be reached from here?",
        "tags": ["signed"],
        "requestBody": {"content": {"application/json": {"schema": {
            "type": "object", "required": ["port"],
            "properties": {"port": {"type": "integer", "minimum": 1, "maximum": 65535}},
            "additionalProperties": False}}}},
        "responses": {"200": json_answer(ReachAnswer, "whether the caller's server "
                                                      "answered there as itself"),
                      "403": {"description": "the request came through a relay or from this "
                                             "machine: nothing to dial back"},
                      "503": {"description": "too many dial-backs at once; try again"}},
    }}

    def __init__(self, secure: bool, held: Held, allow_loopback: bool = False,
                 timeout: float = 2.0):
        self.secure = secure
        self.held = held  # a budget of its own: a flood of checks never blocks tunnels
        self.allow_loopback = allow_loopback
        self.timeout = timeout

    def on_post(self, req: falcon.Request, resp: falcon.Response) -> None:
        body = read_json(req)
        port = body.get("port") if isinstance(body, dict) else None
        if not isinstance(port, int) or isinstance(port, bool) or not 0 < port < 65536 \
                or set(body) != {"port"}:
            raise falcon.HTTPBadRequest(title="Invalid reach check",
                                        description="Expected {\"port\": 1-65535}.")
        ip = str(req.remote_addr or "")
        if ip.startswith("::ffff:"):
            ip = ip[7:]
        try:
            loopback = Address.parse(ip).kind == "loopback"
        except ValueError:
            loopback = True
        if loopback and not self.allow_loopback:
            # Relayed requests come from this node's own loopback: a dial-back there would
            # probe this machine's own ports for a stranger.
            raise falcon.HTTPForbidden(title="No dial-back here",
                                       description="This request came through a relay (or "
                                                   "from this machine): there is nothing to "
                                                   "dial back.")
        release = self.held.acquire("a dial-back")
        try:
            send(resp, dial_back(ip, port, req.context.caller, self.secure, self.timeout))
        finally:
            release()


def dial_back(ip: str, port: int, node_id: str, secure: bool, timeout: float
              ) -> ReachAnswer:
    """Dial ``ip``:``port`` once, and say whether ``node_id``'s server answered there."""
    where = f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"
    try:
        with socket.create_connection((ip, port), timeout=timeout) as sock:
            if not secure:
                return ReachAnswer(reachable=True, address=where)
            with tls.client_context().wrap_socket(sock) as wrapped:
                presented = tls.check_peer(wrapped, node_id, where)
                return ReachAnswer(reachable=presented == node_id, address=where)
    except (OSError, ssl.SSLError, ValueError) as err:
        return ReachAnswer(False, where, str(err)[:200] or type(err).__name__)
    except Exception as err:  # noqa: BLE001 - another node answered there, say so
        return ReachAnswer(False, where, str(err)[:200])
