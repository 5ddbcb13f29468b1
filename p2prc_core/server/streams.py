"""Routes that switch a connection to a byte stream (see ``upgrade``): a tunnel into one of
the caller's containers, and a relay's three routes. Plus the dial-back check, which tells a
node whether it can be dialled at all."""

from __future__ import annotations

import logging
import select
import socket
import ssl
from collections.abc import Callable

import falcon

from p2prc_core import tls
from p2prc_core.config import Settings
from p2prc_core.containers import ContainerService
from p2prc_core.identity import is_node_id
from p2prc_core.intake import source_prefix
from p2prc_core.models import Address
from p2prc_core.relayhub import RelayHub, RelayRefusal
from p2prc_core.server.bodies import read_json
from p2prc_core.server.resources import json_answer, send
from p2prc_core.server.upgrade import Held, Share, serving, switch, wants_upgrade
from p2prc_core.splice import no_delay, splice
from p2prc_core.wire import ReachAnswer, RelayWait

log = logging.getLogger("p2prc.server")

TUNNEL_IDLE_SECONDS = 3600.0  # a tunnel with no byte either way for this long is closed
STRANGERS = "nodes this relay does not trust"  # their polls share half the poll budget


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
        target, release = self.held.opening("a tunnel", lambda: _dial_local(external[port]))
        log.info("tunnel to %s port %d for %s", lease.id[:12], port, req.context.caller)
        switch(req, resp, lambda sock: _join(sock, target, TUNNEL_IDLE_SECONDS), release)


def _join(sock: socket.socket, other: socket.socket, idle: float | None,
          bytes_per_second: float | None = None) -> None:
    other.settimeout(None)
    for each in (sock, other):
        no_delay(each)
    done = splice(sock, other, idle_seconds=idle, alive=serving,
                  bytes_per_second=bytes_per_second)
    log.debug("stream closed (%s): %d bytes in, %d out", done.reason, done.a_to_b,
              done.b_to_a)


class RelayWaitResource:
    """``GET /v1/relay/wait``: a node that cannot be dialled waits for a client here."""

    AUTH = {"get": "signed"}
    OPENAPI = {"get": {
        "summary": "Relay: wait (long poll) for a client that wants to reach the caller",
        "tags": ["signed"],
        "responses": {"200": json_answer(RelayWait, "the token: accept the client with "
                                                    "POST /v1/relay/accept"),
                      "204": {"description": "no client came; poll again"},
                      "429": {"description": "the caller already waits here twice, or its "
                                             "network holds as many polls as it may (a node "
                                             "the relay does not trust); Retry-After"},
                      "403": {"description": "this node is not a relay, or not for the caller"},
                      "503": {"description": "the relay holds as many nodes, or polls, as it "
                                             "may; Retry-After"}},
    }}

    def __init__(self, settings: Settings, hub: RelayHub, is_trusted: Callable[[str], bool],
                 held: Held):
        self.settings = settings
        self.hub = hub
        self.is_trusted = is_trusted
        self.held = held

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        caller = req.context.caller
        _relaying(self.settings)
        trusted = self.is_trusted(caller)
        if not self.settings.relay_open and not trusted:
            raise falcon.HTTPForbidden(
                title="Not relayed",
                description=f"This relay carries only nodes its owner trusts; node {caller} "
                            f"is not one ('p2prc trust {caller}' on the relay, or "
                            f"relay_open = true).")
        sock = req.env.get("gunicorn.socket")
        release = self.held.acquire("a relay poll", [] if trusted else self._strangers(req))
        try:
            # A polling node sends nothing while it waits: readable means it closed.
            token = self.hub.wait(caller, alive=serving, trusted=trusted,
                                  gone=lambda: sock is not None and
                                  _readable(sock))
        finally:
            release()
        if token is None:
            resp.status = falcon.HTTP_204
            return
        send(resp, RelayWait(token))

    def _strangers(self, req: falcon.Request) -> list[Share]:
        """The limits on a node the relay does not trust (``relay_open``): keys are free, so
        per network, and all such nodes together take at most half the polls: the rest are
        kept for the nodes it trusts."""
        return [Share(f"network {caller_network(req)}", self.settings.relay_polls_per_network),
                Share(STRANGERS, max(1, self.held.limit // 2), 503)]


class _RelayStream:
    """What the relay's two stream routes are built from: the settings that say whether this
    node relays, the hub where nodes wait, and the budget of one leg of the streams held at
    once (the clients' connects and the nodes' accepts have one each, so that connects
    never take the threads their accepts need)."""

    def __init__(self, settings: Settings, hub: RelayHub, held: Held):
        self.settings = settings
        self.hub = hub
        self.held = held

    def join(self, sock: socket.socket, other: socket.socket,
             bytes_per_second: float | None = None) -> None:
        _join(sock, other, float(self.settings.relay_idle_seconds), bytes_per_second)


class RelayAcceptResource(_RelayStream):
    """``POST /v1/relay/accept?token=T``: the waiting node takes the client it was told of."""

    AUTH = {"post": "signed"}
    OPENAPI = {"post": {
        "summary": "Relay: switch to the stream of the client a token names",
        "tags": ["signed"],
        "parameters": [{"name": "token", "in": "query", "required": True,
                        "schema": {"type": "string"}}],
        "responses": {"101": {"description": "the client's stream follows"},
                      "403": {"description": "this node is not a relay"},
                      "404": {"description": "no client waits with this token for the "
                                             "caller"},
                      "501": {"description": "this server cannot switch to a stream"},
                      "503": {"description": "the relay carries as many streams as it may; "
                                             "Retry-After"}},
    }}

    def on_post(self, req: falcon.Request, resp: falcon.Response) -> None:
        _relaying(self.settings)
        wants_upgrade(req)
        token = req.get_param("token", required=True)
        # No share: a node accepts only the clients that the connects' shares let in.
        client, release = self.held.opening(
            "a relayed stream", lambda: self.hub.accept(req.context.caller, token))
        switch(req, resp, lambda sock: self.join(sock, client), release)


class RelayConnectResource(_RelayStream):
    """``POST /v1/relay/connect?node=ID``: a stream to a node that waits here. Signed by any
    caller (what it carries is TLS to that node, which the node checks), so that the streams
    one key, and one network, hold at once can be bounded: keys are free, networks are not."""

    AUTH = {"post": "signed"}
    OPENAPI = {"post": {
        "summary": "Relay: switch to a stream to a node that waits here",
        "tags": ["signed"],
        "parameters": [{"name": "node", "in": "query", "required": True,
                        "schema": {"type": "string"}}],
        "responses": {"101": {"description": "the node's stream follows (speak TLS to it)"},
                      "401": {"description": "not signed"},
                      "403": {"description": "this node is not a relay"},
                      "404": {"description": "the node does not wait here"},
                      "429": {"description": "the caller's key, or its network, holds as "
                                             "many streams here as it may; Retry-After"},
                      "501": {"description": "this server cannot switch to a stream"},
                      "503": {"description": "the relay carries as many connections as it "
                                             "may, or the node's streams take its share; "
                                             "Retry-After"},
                      "504": {"description": "the node did not come to accept"}},
    }}

    def on_post(self, req: falcon.Request, resp: falcon.Response) -> None:
        _relaying(self.settings)
        wants_upgrade(req)
        node_id = req.get_param("node", required=True)
        if not is_node_id(node_id):
            raise falcon.HTTPBadRequest(title="Invalid node",
                                        description="node is a node id (26 letters and "
                                                    "digits).")
        if not self.hub.known(node_id):  # before it takes a thread's slot
            raise RelayRefusal(f"Node {node_id} does not keep a connection to this relay.",
                               404, "Not relayed here")
        node, release = self.held.opening("a relayed stream", lambda: self.hub.connect(node_id),
                                          self._shares(req, node_id))
        rate = self.settings.relay_mbit * 125_000 or None

        def carry(sock: socket.socket) -> None:
            with self.hub.counted():
                self.join(sock, node, rate)

        switch(req, resp, carry, release)

    def _shares(self, req: falcon.Request, node_id: str) -> list[Share]:
        """One key, one network (keys are free) and one node (half: streams to one node
        never take all the others') take each a part only."""
        return [Share(f"key {req.context.caller}", self.settings.relay_streams_per_key),
                Share(f"network {caller_network(req)}",
                      self.settings.relay_streams_per_network),
                Share(f"node {node_id}", max(1, self.held.limit // 2), 503)]


def caller_network(req: falcon.Request) -> str:
    """The network a request came from, as the relay's limits count it: an IPv4 /24, or an
    IPv6 /64 (what one home or one server is given)."""
    return source_prefix(req.remote_addr, ipv6_bits=64)


def _readable(sock: socket.socket) -> bool:
    """Whether ``sock`` has something to read (or was closed), without waiting; poll, not
    select, which fails for descriptors past 1023 (the front holds many)."""
    poller = select.poll()
    poller.register(sock, select.POLLIN)
    return bool(poller.poll(0))


def _relaying(settings: Settings) -> None:
    if not settings.relay:
        raise RelayRefusal("This node does not relay (its owner set relay = false).", 403,
                           "Not a relay")


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
