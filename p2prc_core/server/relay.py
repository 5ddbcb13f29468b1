"""A relay's routes (see ``relayhub`` for the flow): a node that cannot be dialled waits
(``POST /v1/relay/listen``; a node of an earlier version polls, ``GET /v1/relay/wait``), a
client connects to it (``POST /v1/relay/connect``), the node accepts (``POST
/v1/relay/accept``). Listening nodes (``relay_listen``) and joined streams
(``relay_loop``) are each held by one loop thread per worker, so a relay holds a thousand
nodes and hundreds of streams with a few threads."""

from __future__ import annotations

import contextlib
import logging
import select
import socket
from collections.abc import Callable

import falcon

from p2prc_core.config import Settings
from p2prc_core.identity import is_node_id
from p2prc_core.intake import source_prefix
from p2prc_core.relayhub import RelayHub, RelayRefusal
from p2prc_core.server.relay_listen import listen_loop
from p2prc_core.server.resources import json_answer, send
from p2prc_core.server.upgrade import Held, Share, keep, serving, switch, wants_upgrade
from p2prc_core.splice import Spliced, SpliceLoop, no_delay, process_loop
from p2prc_core.wire import RelayWait

log = logging.getLogger("p2prc.server")

STRANGERS = "nodes this relay does not trust"  # their polls share half the poll budget

def relay_loop() -> SpliceLoop:
    """This worker process's loop for relayed streams."""
    return process_loop("p2prc-relay")


class _Waits:
    """What the two ways of waiting at the relay share: who may wait, and a place in the
    budget ``held`` (nodes the relay does not trust: per network, and half of it)."""

    def __init__(self, settings: Settings, hub: RelayHub, is_trusted: Callable[[str], bool],
                 held: Held):
        self.settings = settings
        self.hub = hub
        self.is_trusted = is_trusted
        self.held = held

    def admit(self, req: falcon.Request, what: str) -> tuple[str, bool, Callable[[], None]]:
        """The caller, whether the relay trusts it, and its place (given back by the
        function); 403 when it may not wait here, 429 or 503 when there is no place."""
        caller = req.context.caller
        _relaying(self.settings)
        trusted = self.is_trusted(caller)
        if not self.settings.relay_open and not trusted:
            raise falcon.HTTPForbidden(
                title="Not relayed",
                description=f"This relay carries only nodes its owner trusts; node {caller} "
                            f"is not one ('p2prc trust {caller}' on the relay, or "
                            f"relay_open = true).")
        return caller, trusted, self.held.acquire(what, [] if trusted else strangers(
            req, self.settings, self.held))


class RelayWaitResource(_Waits):
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

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        caller, trusted, release = self.admit(req, "a relay poll")
        sock = req.env.get("gunicorn.socket")
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


class RelayListenResource(_Waits):
    """``POST /v1/relay/listen``: a node that cannot be dialled keeps one connection here,
    switched to a stream; a line for each client that comes (``relay_listen``). It holds no
    thread: one loop per worker holds them all."""

    AUTH = {"post": "signed"}
    OPENAPI = {"post": {
        "summary": "Relay: listen for clients that want to reach the caller, on one stream",
        "tags": ["signed"],
        "responses": {"101": {"description": "lines follow: a RelayWait as JSON for each "
                                             "client (accept it with POST "
                                             "/v1/relay/accept), an empty line every 15 s"},
                      "403": {"description": "this node is not a relay, or not for the caller"},
                      "429": {"description": "the caller already waits here twice, or its "
                                             "network holds as many waiting nodes as it may "
                                             "(a node the relay does not trust); Retry-After"},
                      "501": {"description": "this server cannot switch to a stream"},
                      "503": {"description": "the relay holds as many nodes as it may; "
                                             "Retry-After"}},
    }}

    def on_post(self, req: falcon.Request, resp: falcon.Response) -> None:
        _relaying(self.settings)
        wants_upgrade(req)
        caller, trusted, release = self.admit(req, "a waiting node")
        try:
            waiting = self.hub.register(caller, trusted, stays=True)
        except BaseException:
            release()
            raise

        def take(sock: socket.socket) -> bool:
            keep(sock)
            # A node whose machine vanished (no FIN) is noticed when a keepalive goes
            # unacknowledged for 30 s, not after TCP's retries (many minutes).
            with contextlib.suppress(OSError, AttributeError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, 30_000)
            listen_loop().hold(sock, waiting, release, serving)
            return True

        def never_taken() -> None:  # the client left before the 101 went out
            waiting.close()
            release()

        switch(req, resp, take, never_taken)


class _RelayStream:
    """What the relay's two stream routes are built from: the settings that say whether this
    node relays, the hub where nodes wait, the budget of one leg of the streams carried at
    once (the clients' connects and the nodes' accepts have one each), and the loop that
    carries them all (``relay_loop``): a stream holds no thread once it is joined."""

    def __init__(self, settings: Settings, hub: RelayHub, held: Held):
        self.settings = settings
        self.hub = hub
        self.held = held

    def carry(self, sock: socket.socket, other: socket.socket, release: Callable[[], None],
              bytes_per_second: float | None = None,
              then: Callable[[], None] | None = None) -> bool:
        """Hand the switched connection and ``other`` to the relay's loop; ``release`` (and
        ``then``) once the stream ends. True: the connection is the loop's now."""
        for each in (sock, other):
            no_delay(each)

        def finished(done: Spliced) -> None:
            log.debug("relayed stream closed (%s): %d bytes in, %d out", done.reason,
                      done.a_to_b, done.b_to_a)
            release()
            if then is not None:
                then()

        try:
            relay_loop().carry(sock, other,
                               idle_seconds=float(self.settings.relay_idle_seconds),
                               alive=serving, bytes_per_second=bytes_per_second,
                               finished=finished)
        except BaseException:  # not the loop's: the other end is closed here, this one
            other.close()  # by gunicorn, and the slot given back by switch
            raise
        keep(sock)  # the loop's now: gunicorn must not close it
        return True


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
        switch(req, resp, lambda sock: self.carry(sock, client, release), release)


class RelayConnectResource(_RelayStream):
    """``POST /v1/relay/connect?node=ID``: a stream to a node that waits here. Signed by any
    caller (what it carries is TLS to that node, which the node checks), so that the streams
    one key, and one network, hold at once can be bounded: keys are free, networks are not.
    Waiting for the node to come and accept holds a thread (at most ``ACCEPT_SECONDS``), from
    a budget of its own (``setups``); the stream then holds none."""

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
                                             "may, or the node's streams take its share, or "
                                             "as many streams are being set up as it has "
                                             "threads for; Retry-After"},
                      "504": {"description": "the node did not come to accept"}},
    }}

    def __init__(self, settings: Settings, hub: RelayHub, held: Held, setups: Held):
        super().__init__(settings, hub, held)
        self.setups = setups

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
        # The same shares of the set-ups as of the streams: a node that never accepts
        # holds its connects' threads for ACCEPT_SECONDS, half of them at most.
        setting_up = self.setups.acquire("a relayed stream being set up",
                                         self._shares(req, node_id, self.setups))
        try:
            node, release = self.held.opening("a relayed stream",
                                              lambda: self.hub.connect(node_id),
                                              self._shares(req, node_id, self.held))
        finally:
            setting_up()
        rate = self.settings.relay_mbit * 125_000 or None

        def carry(sock: socket.socket) -> bool:
            return self.carry(sock, node, release, rate, then=self.hub.count())

        switch(req, resp, carry, release)

    def _shares(self, req: falcon.Request, node_id: str, held: Held) -> list[Share]:
        """One key, one network (keys are free) and one node (half: streams to one node
        never take all the others') take each a part of ``held`` only."""
        return [Share(f"key {req.context.caller}", self.settings.relay_streams_per_key),
                Share(f"network {caller_network(req)}",
                      self.settings.relay_streams_per_network),
                Share(f"node {node_id}", max(1, held.limit // 2), 503)]


FDS_KEPT = 512  # descriptors a worker keeps for all else when it sizes the relay's budgets


def budgets(settings: Settings) -> tuple[int, int]:
    """The waiting nodes, and the relayed streams (each end), one worker holds at most: the
    settings' (``relay_max_nodes``, ``relay_streams``), or fewer where this process's limit
    of open descriptors would not have room. A waiting node takes two (its connection and
    its Unix listener), a stream's end two (its connection and the Unix socket to the other
    end); half the room is for nodes, half for both ends of the streams."""
    import resource

    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    room = (1 << 30) if soft == resource.RLIM_INFINITY else max(0, soft - FDS_KEPT)
    nodes = min(settings.relay_max_nodes, max(1, room // 4))
    legs = min(settings.relay_streams, max(2, room // 8))
    if settings.relay and (nodes, legs) != (settings.relay_max_nodes, settings.relay_streams):
        log.warning("this process may open %d descriptors: each worker holds %d waiting "
                    "nodes and %d relayed streams at most (not %d and %d); raise its limit "
                    "(ulimit -n) to hold more", soft, nodes, legs, settings.relay_max_nodes,
                    settings.relay_streams)
    return nodes, legs


def strangers(req: falcon.Request, settings: Settings, held: Held) -> list[Share]:
    """The limits on a node the relay does not trust (``relay_open``), waiting by poll or
    by listening: keys are free, so per network, and all such nodes together take at most
    half of ``held``: the rest is kept for the nodes it trusts."""
    return [Share(f"network {caller_network(req)}", settings.relay_polls_per_network),
            Share(STRANGERS, max(1, held.limit // 2), 503)]


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


