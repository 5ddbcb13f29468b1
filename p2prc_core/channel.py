"""Connections to one peer: TLS checked against the node id it must present, for httpx (the
API) and for plain sockets (the speed test) alike.

A ``Channel`` knows the peer's address, the node id expected there (``None`` on first
contact, when the id presented is taken and reported to ``on_contact``), and whether the
network runs TLS (the default) or plain HTTP (``transport = "http"``, a lab). Every new
connection is checked right after its handshake, before a byte of a request is sent.

A request has one absolute deadline (``within``): read timeouts alone restart with every
byte, so a peer that drips its answer a byte every few seconds would hold a client for ever.
Inside ``within``, every connection a channel opens in this thread, and every read and write
on one, waits at most what is left of the deadline; when nothing is left, the request fails
with one clear ``PeerError``.
"""

from __future__ import annotations

import queue
import socket
import ssl
import threading
import time
from collections.abc import AsyncIterable, Callable, Iterable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any, Protocol, TypeVar, cast

from p2prc_core import tls
from p2prc_core.errors import PeerError, PeerRefused, RelayRefused, unreachable
from p2prc_core.httplib import httpcore, httpx
from p2prc_core.identity import NodeIdentity
from p2prc_core.models import Endpoint
from p2prc_core.signing import sign_request
from p2prc_core.text import seconds_text
from p2prc_core.upgrade_client import upgrade_sync


class DirectPaths(Protocol):
    """What opens a direct path to a node met through its relay (``punched.PunchedPaths``):
    a connected socket to the node's p2prc port, or None (use the relay)."""

    def socket_to(self, endpoint: Endpoint) -> socket.socket | None: ...


# The endpoint, the node id it presented, and the IP address actually connected to.
Contact = Callable[[Endpoint, str, str | None], None]
T = TypeVar("T")


class Channel:
    """How to reach one peer, and who must answer there. A peer with several addresses is
    dialled at each in turn (in dial order) until one takes the connection; the one that
    did is used for every later connection."""

    def __init__(self, endpoints: Endpoint | list[Endpoint], secure: bool = True,
                 on_contact: Contact | None = None, identity: NodeIdentity | None = None,
                 paths: DirectPaths | None = None):
        self.candidates = [endpoints] if isinstance(endpoints, Endpoint) else list(endpoints)
        if not self.candidates:
            raise PeerError("no address to dial")
        self.endpoint = self.candidates[0]
        self.secure = secure
        self.node_id = self.endpoint.node_id  # expected; on first contact, the one presented
        self.on_contact = on_contact
        self.identity = identity  # signs what a relay is asked (see ``relayed``)
        self.paths = paths  # a node met through its relay is tried direct first (punched)

    def punched(self, endpoint: Endpoint) -> socket.socket | None:
        """A connection to the node a relayed ``endpoint`` names over a punched path, or
        None (no paths, or none punched: the relay, then)."""
        if self.paths is None or not endpoint.relay:
            return None
        return self.paths.socket_to(endpoint)

    def dial(self, open_one: Callable[[Endpoint, float], T], timeout: float) -> T:
        """Open a connection, happy-eyeballs style (RFC 8305): to the endpoint that answered
        last, then, every STAGGER seconds or at once when an attempt fails, to the next in
        dial order, all racing; the first to connect wins and the others are closed. A peer
        with many dead addresses costs one timeout, not one per address.

        :raises PeerError: none took it; the message names each and why.
        """
        order = [self.endpoint] + [e for e in self.candidates if e != self.endpoint]
        if len(order) == 1:
            try:
                return open_one(order[0], timeout)
            except (OSError, httpcore.ConnectError, httpcore.ConnectTimeout) as err:
                raise unreachable(order[0], err, timeout) from None
        results: queue.Queue[tuple[Endpoint, Any, BaseException | None]] = queue.Queue()

        def attempt(endpoint: Endpoint) -> None:
            try:
                results.put((endpoint, open_one(endpoint, timeout), None))
            except BaseException as err:  # noqa: BLE001 - reported to the dialling thread
                results.put((endpoint, None, err))

        deadline = time.monotonic() + timeout
        started = finished = 0
        failures: list[str] = []
        answered: set[Endpoint] = set()
        while finished < len(order):
            if started < len(order) and started == finished:
                threading.Thread(target=attempt, args=(order[started],), daemon=True).start()
                started += 1
            wait = STAGGER if started < len(order) else deadline - time.monotonic()
            try:
                endpoint, opened, failed = results.get(timeout=max(0.0, wait))
            except queue.Empty:
                if started < len(order):
                    threading.Thread(target=attempt, args=(order[started],),
                                     daemon=True).start()
                    started += 1
                    continue
                break
            finished += 1
            answered.add(endpoint)
            if failed is None:
                self.endpoint = endpoint
                _close_later(results, started - finished)
                return cast(T, opened)
            if isinstance(failed, PeerError) and not isinstance(failed, tls.NodeMismatch):
                failures.append(str(failed))  # a relay that refused, or is unreachable
                continue
            if not isinstance(failed, OSError | httpcore.ConnectError | httpcore.ConnectTimeout):
                _close_later(results, started - finished)
                raise failed
            failures.append(str(unreachable(endpoint, failed, timeout)))
        _close_later(results, started - finished)  # attempts still under way, if any
        failures += [f"{e}: no answer within {timeout:g} s" for e in order[:started]
                     if e not in answered]
        raise PeerError("no path to this peer works: " + "; ".join(failures)
                        if failures else f"no address of this peer answered within "
                        f"{timeout:g} s")

    @property
    def scheme(self) -> str:
        return "https" if self.secure else "http"

    def check(self, ssl_object: Any, peer_ip: str | None) -> None:
        """The one check of every new TLS connection (see ``tls.check_peer``); then
        ``on_contact``, which may refuse it too (a node pinned at the address dialled). A
        relayed connection always expects a known node, and pins nothing."""
        presented = tls.check_peer(ssl_object, self.node_id, self.endpoint)
        if self.on_contact is not None and not self.endpoint.relay:
            self.on_contact(self.endpoint, presented, peer_ip)
        if self.node_id is None:
            self.node_id = presented

    def wrap(self, sock: socket.socket, timeout: float) -> socket.socket:
        """TLS over a connected socket, checked; the socket itself in a plain-HTTP lab.

        :raises PeerError: the handshake failed, or another node answered.
        """
        if not self.secure:
            return sock
        try:
            wrapped = tls.client_context().wrap_socket(sock)
        except (ssl.SSLError, OSError) as err:
            sock.close()
            raise handshake_failed(self.endpoint, err, timeout) from None
        peer = wrapped.getpeername() if sock.family != socket.AF_UNIX else None
        try:
            self.check(wrapped, str(peer[0]) if peer else None)
        except BaseException:
            wrapped.close()
            raise
        return wrapped

    def connect(self, timeout: float) -> socket.socket:
        """A new connection, TLS checked (for the speed test's plain socket)."""
        def open_one(endpoint: Endpoint, wait: float) -> Any:
            if endpoint.relay:
                return self.punched(endpoint) or relayed(endpoint, wait, self.secure,
                                                         self.identity)
            return socket.create_connection((endpoint.host, endpoint.port), timeout=wait)

        sock = self.dial(open_one, timeout)
        if isinstance(sock, httpcore.NetworkStream):  # through a relay: TLS inside its stream
            return cast(socket.socket, StreamSocket(self.start_tls(sock, timeout), timeout))
        sock.settimeout(timeout)
        return self.wrap(sock, timeout)

    def start_tls(self, stream: httpcore.NetworkStream, timeout: float | None
                  ) -> httpcore.NetworkStream:
        """TLS over a stream (a relay's), the node checked as after every handshake."""
        if not self.secure:
            return stream
        return _CheckingStream(stream, self).start_tls(tls.client_context(), None, timeout)

    def http(self, timeout: float, **options: Any) -> httpx.Client:
        """An httpx client whose every connection goes through ``dial`` and, over TLS, is
        checked before it carries a request."""
        transport = httpx.HTTPTransport(verify=tls.client_context())
        # httpx offers no setting for httpcore's network backend: give its pool ours.
        transport._pool = httpcore.ConnectionPool(
            ssl_context=tls.client_context(), network_backend=_ChannelBackend(self))
        return httpx.Client(base_url=self.endpoint.url(self.scheme), timeout=timeout,
                            transport=transport, trust_env=False,
                            headers={"User-Agent": "p2prc"}, **options)


def _append(data: bytearray, chunk: bytes, limit: int,
            too_large: Callable[[], Exception]) -> None:
    data += chunk
    if len(data) > limit:
        raise too_large()


def read_capped(chunks: Iterable[bytes], limit: int,
                too_large: Callable[[], Exception]) -> bytes:
    """An answer read chunk by chunk, at most ``limit`` bytes: past that, ``too_large()``
    is raised before another chunk is read. The one rule for every answer a peer (or a
    gateway) sends, whatever reads it."""
    data = bytearray()
    for chunk in chunks:
        _append(data, chunk, limit, too_large)
    return bytes(data)


async def read_capped_async(chunks: AsyncIterable[bytes], limit: int,
                            too_large: Callable[[], Exception]) -> bytes:
    """``read_capped`` for an asynchronous stream of chunks."""
    data = bytearray()
    async for chunk in chunks:
        _append(data, chunk, limit, too_large)
    return bytes(data)


STAGGER = 0.25  # seconds between the start of one address's attempt and the next's


def _close_later(results: queue.Queue[tuple[Endpoint, Any, BaseException | None]],
                 pending: int) -> None:
    """Close the connections of attempts still under way as they come in (they lost)."""
    def close_them() -> None:
        for _ in range(pending):
            _, opened, _ = results.get()
            if opened is not None:
                opened.close()

    if pending > 0:
        threading.Thread(target=close_them, daemon=True).start()


def handshake_failed(where: object, err: BaseException, timeout: float | None) -> PeerError:
    """A failed TLS handshake, said as what it most likely is."""
    if isinstance(err, ssl.SSLError):
        return PeerError(f"{where} did not complete a TLS handshake ({err.reason or err}): "
                         f"not a p2prc node, or one that runs transport = \"http\"")
    return unreachable(where, err, timeout)


class Deadline:
    """The instant by which a whole request must be done: connection, head and body."""

    def __init__(self, seconds: float):
        self.seconds = seconds
        self.ends = time.monotonic() + seconds
        self.received = 0  # bytes of answers read so far

    def left(self) -> float:
        return self.ends - time.monotonic()

    def run(self, step: Callable[[float], T], timeout: float | None, where: object) -> T:
        """``step(wait)``, ``wait`` the shorter of ``timeout`` and what is left; a timeout
        of the step when what was left was the shorter is this deadline's error.

        :raises PeerError: nothing is left (``expired``).
        """
        left = self.left()
        if left <= 0:
            raise self.expired(where)
        if timeout is not None and timeout < left:
            return step(timeout)
        try:
            return step(left)
        except (httpcore.TimeoutException, TimeoutError):
            raise self.expired(where) from None

    def expired(self, where: object) -> PeerError:
        """The one-line error of a request to ``where`` whose time ran out."""
        seconds = seconds_text(self.seconds)
        if not self.received:
            return PeerError(f"{where} did not answer within {seconds}")
        return PeerError(f"{where} did not finish its answer within {seconds} (it sent it too "
                         f"slowly): {self.received} bytes came in that time")


_DEADLINE: ContextVar[Deadline | None] = ContextVar("p2prc_request_deadline", default=None)


@contextmanager
def within(seconds: float) -> Iterator[Deadline]:
    """Every connection a channel opens in this thread inside the block, and every read and
    write on one, ends ``seconds`` from now (or by an enclosing deadline, if that is
    earlier): one deadline for a whole request, however slowly the peer answers."""
    outer = _DEADLINE.get()
    deadline = Deadline(seconds)
    if outer is not None and outer.ends < deadline.ends:
        deadline = outer
    token = _DEADLINE.set(deadline)
    try:
        yield deadline
    finally:
        _DEADLINE.reset(token)


def _bounded(step: Callable[[float | None], T], timeout: float | None, where: object) -> T:
    """``step`` within the deadline of the request in progress, if there is one."""
    deadline = _DEADLINE.get()
    return step(timeout) if deadline is None else deadline.run(step, timeout, where)


class _CheckingStream(httpcore.NetworkStream):
    """A connection to the peer: checked after its TLS handshake, and every read and write
    (the handshake too) within the deadline of the request in progress (``within``)."""

    def __init__(self, inner: httpcore.NetworkStream, channel: Channel):
        self._inner = inner
        self._channel = channel

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        data = _bounded(lambda wait: self._inner.read(max_bytes, wait), timeout,
                        self._channel.endpoint)
        deadline = _DEADLINE.get()
        if deadline is not None:
            deadline.received += len(data)
        return data

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        _bounded(lambda wait: self._inner.write(buffer, wait), timeout, self._channel.endpoint)

    def close(self) -> None:
        self._inner.close()

    def get_extra_info(self, info: str) -> Any:
        return self._inner.get_extra_info(info)

    def start_tls(self, ssl_context: ssl.SSLContext, server_hostname: str | None = None,
                  timeout: float | None = None) -> httpcore.NetworkStream:
        try:
            stream = _bounded(lambda wait: self._inner.start_tls(ssl_context, server_hostname,
                                                                 wait),
                              timeout, self._channel.endpoint)
        except httpcore.ConnectError as err:
            self._inner.close()
            cause = err.__cause__ if isinstance(err.__cause__, ssl.SSLError) else err
            raise handshake_failed(self._channel.endpoint, cause, timeout) from None
        except PeerError:
            self._inner.close()
            raise
        address = stream.get_extra_info("server_addr")
        try:
            self._channel.check(stream.get_extra_info("ssl_object"),
                                str(address[0]) if address else None)
        except BaseException:
            stream.close()
            raise
        return _CheckingStream(stream, self._channel)  # its reads keep to the deadline too


class _ChannelBackend(httpcore.NetworkBackend):
    """httpcore's own sockets, dialled by the channel (whatever host the URL names), with
    the peer's key checked after each TLS handshake."""

    def __init__(self, channel: Channel):
        self._channel = channel
        self._inner = httpcore.SyncBackend()

    def connect_tcp(self, host: str, port: int, timeout: float | None = None,
                    local_address: str | None = None,
                    socket_options: Iterable[Any] | None = None) -> httpcore.NetworkStream:
        def open_one(endpoint: Endpoint, wait: float) -> httpcore.NetworkStream:
            if endpoint.relay:
                direct = self._channel.punched(endpoint)
                if direct is not None:
                    from httpcore._backends.sync import SyncStream

                    return SyncStream(direct)
                return relayed(endpoint, wait, self._channel.secure, self._channel.identity)
            return self._inner.connect_tcp(endpoint.host, endpoint.port, wait, local_address,
                                           socket_options)

        stream = _bounded(lambda wait: self._channel.dial(
            open_one, wait if wait is not None else 10.0), timeout, self._channel.endpoint)
        return _CheckingStream(stream, self._channel)

    def connect_unix_socket(self, path: str, timeout: float | None = None,
                            socket_options: Iterable[Any] | None = None
                            ) -> httpcore.NetworkStream:
        raise PeerError("p2prc peers are reached over TCP only")

    def sleep(self, seconds: float) -> None:
        self._inner.sleep(seconds)


def relayed(endpoint: Endpoint, timeout: float, secure: bool = True,
            identity: NodeIdentity | None = None) -> httpcore.NetworkStream:
    """A stream to ``endpoint.node_id`` through the relay at ``endpoint`` (whose own key is
    checked first): the relay joins it to the node's waiting connection. What goes over it
    next is TLS to the node itself, which the relay cannot read.

    The connect is signed by ``identity`` (the relay bounds the streams of one key, and of
    one network); a caller without one (a script) signs with a key made for this stream, a
    stranger to the relay.

    :raises PeerError: the relay cannot be reached or is another node; PeerRefused: it
        refused (the node does not wait there, it is full, or the caller holds its most).
    """
    relay = Endpoint(endpoint.host, endpoint.port, endpoint.relay)
    where = f"relay {relay}"
    path, query = "/v1/relay/connect", f"node={endpoint.node_id}"
    signed = sign_request(identity or NodeIdentity.generate(), "POST", path, query, b"",
                          endpoint.relay or "")
    try:
        stream = httpcore.SyncBackend().connect_tcp(endpoint.host, endpoint.port, timeout)
    except (httpcore.ConnectError, httpcore.ConnectTimeout) as err:
        raise unreachable(where, err.__cause__ or err, timeout) from None
    try:
        if secure:
            try:
                stream = stream.start_tls(tls.client_context(), None, timeout)
            except httpcore.ConnectError as err:
                cause = err.__cause__ if isinstance(err.__cause__, ssl.SSLError) else err
                raise handshake_failed(where, cause, timeout) from None
            tls.check_peer(stream.get_extra_info("ssl_object"), endpoint.relay, where)
        try:
            leftover = upgrade_sync(lambda: stream.read(65536, timeout),
                                    lambda data: stream.write(data, timeout), where,
                                    f"{path}?{query}", relay.address, signed, timeout=timeout)
        except (httpcore.NetworkError, httpcore.TimeoutException) as err:
            raise unreachable(where, err, timeout) from None
        except PeerRefused as err:  # the relay's word, not the node's
            raise RelayRefused(str(err), err.status) from None
        if leftover:
            raise PeerError(f"{where} sent bytes the node could not have sent yet")
    except BaseException:
        stream.close()
        raise
    return stream


class StreamSocket:
    """The few socket calls the speed test makes, over an httpcore stream (TLS inside a
    relay's stream, which no socket object can carry)."""

    def __init__(self, stream: httpcore.NetworkStream, timeout: float):
        self.stream = stream
        self.timeout = timeout
        self._buffer = b""

    def recv(self, size: int) -> bytes:
        if self._buffer:
            data, self._buffer = self._buffer[:size], self._buffer[size:]
            return data
        try:
            data = self.stream.read(max(size, 1), self.timeout)
        except httpcore.ReadTimeout:
            raise TimeoutError from None
        except httpcore.ReadError as err:
            raise OSError(str(err)) from None
        if len(data) > size:
            data, self._buffer = data[:size], data[size:]
        return data

    def recv_into(self, buffer: Any, size: int = 0) -> int:
        data = self.recv(size or len(buffer))
        buffer[:len(data)] = data
        return len(data)

    def sendall(self, data: bytes | memoryview) -> None:
        try:
            self.stream.write(bytes(data), self.timeout)
        except httpcore.WriteTimeout:
            raise TimeoutError from None
        except httpcore.WriteError as err:
            raise OSError(str(err)) from None

    def setsockopt(self, *args: Any) -> None:
        pass  # the buffers are the relay connection's

    def settimeout(self, timeout: float | None) -> None:
        self.timeout = timeout or self.timeout

    def close(self) -> None:
        self.stream.close()

    def __enter__(self) -> StreamSocket:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
