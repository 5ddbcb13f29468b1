"""``POST /v1/containers/{id}/exec``: a command run in one of the caller's containers, its
standard streams carried over the connection in frames (``exec_frames``), with no SSH
between: what ``p2prc exec`` uses, so that a job costs one engine exec, not a login.

After the 101 the caller sends a ``START`` frame (a ``wire.ExecStart``: the command's words,
never a line the host composes), then its stdin. One thread carries both ways, as
``splice`` does, so the TLS socket is never used from two threads."""

from __future__ import annotations

import logging
import selectors
import socket
import ssl
import time
from collections.abc import Callable
from typing import Any

import falcon

from p2prc_core import exec_frames as fr
from p2prc_core.containers import ContainerError, ContainerService, Lease, limits_environment
from p2prc_core.server.upgrade import Held, serving, switch, wants_upgrade
from p2prc_core.splice import no_delay
from p2prc_core.wire import ExecStart, WireError, decode

log = logging.getLogger("p2prc.server")

START_WITHIN = 10.0  # seconds the caller has to send its START frame after the 101
_BLOCK = 64 << 10  # a read: bigger buffers go back to the kernel and fault in again
_HIGH_WATER = 1 << 20
_WOULD_BLOCK = (BlockingIOError, InterruptedError, ssl.SSLWantReadError,
                ssl.SSLWantWriteError)
_FROM_CALLER = frozenset({fr.STDIN, fr.STDIN_END})
_INBOX_MOST = fr.HEADER + fr.MAX_PAYLOAD  # room for the largest frame a caller may send


class ExecResource:
    """Run a command in one of the caller's containers over this connection."""

    AUTH = {"post": "signed"}
    OPENAPI = {"post": {
        "summary": "Switch to an exec stream: run a command in one of the caller's "
                   "containers, its stdin, stdout, stderr and exit code in frames",
        "tags": ["signed"],
        "responses": {"101": {"description": "send a START frame (ExecStart), then stdin "
                                             "frames; stdout, stderr and EXIT (or ERROR) "
                                             "frames come back"},
                      "400": {"description": "not an upgrade"},
                      "404": {"description": "no container of the caller's has that id"},
                      "501": {"description": "this host's backend cannot run commands in "
                                             "containers (use SSH)"},
                      "503": {"description": "this node carries as many streams as it may"}},
    }}

    def __init__(self, service: Callable[[], ContainerService], held: Held):
        self.service = service
        self.held = held

    def on_post(self, req: falcon.Request, resp: falcon.Response, container_id: str) -> None:
        wants_upgrade(req)
        service = self.service()
        lease = service.find(container_id, req.context.caller)
        if lease.expires <= time.time():  # the reaper has not come by yet: as good as gone
            raise falcon.HTTPNotFound(title="No such container",
                                      description="No p2prc container of yours has that id "
                                                  "on this host.")
        attach = getattr(service.backend, "exec_attach", None)
        if attach is None:
            raise falcon.HTTPNotImplemented(
                title="No exec here", description="This host's backend cannot run commands "
                                                  "in containers: use SSH.")
        release = self.held.acquire("an exec")
        caller = req.context.caller
        switch(req, resp, lambda sock: run(sock, lease, attach, caller, service), release)


def run(sock: socket.socket, lease: Lease, attach: Callable[..., Any], caller: str,
        service: ContainerService) -> None:
    """The stream, once switched: read START, run the command, carry its streams; then,
    if asked and the caller got the EXIT frame, remove the container: the caller's place
    given back before the stream is closed (a caller waits for that close, and may then
    start its next container at once), the container removed after; one that holds GPUs is
    removed before the close too, so that the caller's next GPU container finds them free."""
    attached = None
    try:
        no_delay(sock)
        try:
            start, early = _read_start(sock)
            # The lease's limits: a pooled container's own environment has the pool's.
            env = limits_environment(lease.cpus, lease.memory) if lease.cpus else {}
            attached = attach(lease.id, list(start.argv), start.stdin, env)
        except (fr.FrameError, WireError, ContainerError) as err:
            text = (err.for_peers or f"{err.title}: {err}") if \
                isinstance(err, ContainerError) else str(err)
            sock.sendall(fr.frame(fr.ERROR, text[:500].encode()))
            _linger(sock)
            return
        log.info("exec in %s for %s", lease.id[:12], caller)
        engine = attached.sock
        if not start.stdin:
            early = bytearray()
        ended = carry(sock, engine, attached.exit_code, early, start.stdin, start.alive,
                      what=f"exec in {lease.id[:12]} for {caller}")
        if ended and start.remove:
            attached.close()
            service.give_back(lease.id, caller)  # before the caller hears the stream end
            if lease.gpus:  # GPUs are the host's to share: free before the caller's next
                service.remove(lease.id, None)
            sock.close()
            if not lease.gpus:
                service.remove(lease.id, None)
            log.info("removed %s after its exec, as %s asked", lease.id[:12], caller)
    except (OSError, ssl.SSLError, TimeoutError) as err:
        log.debug("exec stream in %s broke: %s", lease.id[:12], err)
    except ContainerError as err:
        log.warning("could not remove %s after its exec: %s", lease.id[:12], err)
    finally:
        if attached is not None:
            attached.close()
        try:
            sock.close()
        except OSError:
            pass


def _linger(sock: socket.socket, seconds: float = 1.0, most: int = 4 << 20) -> None:
    """Read what the caller still sends, a little while, before the close: a socket closed
    with bytes unread sends a reset, which can reach the caller before the ERROR frame."""
    deadline, taken = time.monotonic() + seconds, 0
    try:
        while taken < most and (left := deadline - time.monotonic()) > 0:
            sock.settimeout(left)
            chunk = sock.recv(_BLOCK)
            if not chunk:
                return
            taken += len(chunk)
    except (OSError, ssl.SSLError):
        pass


def _read_start(sock: socket.socket) -> tuple[ExecStart, bytearray]:
    """The START frame (within ``START_WITHIN``), and what came after it."""
    data = bytearray()
    deadline = time.monotonic() + START_WITHIN
    while True:
        if len(data) >= fr.HEADER and data[0] != fr.START:
            raise fr.FrameError("the stream must begin with a START frame")
        got = fr.frames(data, frozenset({fr.START}), fr.MAX_START, most=1)
        if got:
            return decode(got[0][1], ExecStart), data
        left = deadline - time.monotonic()
        if left <= 0:
            raise fr.FrameError(f"no START frame within {START_WITHIN:g} s")
        sock.settimeout(left)
        try:
            chunk = sock.recv(_BLOCK)
        except TimeoutError:
            raise fr.FrameError(f"no START frame within {START_WITHIN:g} s") from None
        if not chunk:
            raise OSError("the caller left before its START frame")
        data += chunk


class _Bounds:
    """Where the engine's frames end in what it sent: an empty frame of ours (a heartbeat)
    goes only between two of them."""

    def __init__(self) -> None:
        self.left = 0  # bytes of the current frame's payload still to come
        self.head = bytearray()  # a header, part come

    def feed(self, data: bytes) -> None:
        at = 0
        while at < len(data):
            if self.left:
                step = min(self.left, len(data) - at)
                self.left -= step
                at += step
                continue
            need = fr.HEADER - len(self.head)
            self.head += data[at:at + need]
            at += need
            if len(self.head) == fr.HEADER:
                self.left = int.from_bytes(self.head[4:8], "big")
                self.head.clear()

    def between(self) -> bool:
        return not self.left and not self.head


def carry(caller: socket.socket, engine: socket.socket, exit_code: Callable[[], int | None],
          inbox: bytearray, stdin: bool, alive: float = 5.0, what: str = "an exec") -> bool:
    """Caller's STDIN frames to the engine as bytes; the engine's frames to the caller as they
    are (an empty STDOUT frame after ``alive`` seconds without any); then EXIT. The caller
    leaving ends this (the command runs on, its output lost: logged, as ``what``). Whether
    the command ended and the caller got its EXIT frame."""
    to_engine, to_caller = bytearray(), bytearray()
    bounds, last_sent = _Bounds(), time.monotonic()
    stdin_open, engine_done, caller_gone, told = stdin, False, False, False
    if not stdin:
        _shut_write(engine)
    selector = selectors.DefaultSelector()

    def take(kind: int, payload: memoryview) -> bool:
        nonlocal stdin_open
        if kind == fr.STDIN and stdin_open:
            to_engine.extend(payload)  # the one copy: from the caller's frame
        elif kind == fr.STDIN_END:
            stdin_open = False
        return False

    for each in (caller, engine):
        each.setblocking(False)
    try:
        while True:
            fr.each(inbox, _FROM_CALLER, take)
            if not stdin_open and stdin and not to_engine:
                _shut_write(engine)
                stdin = False
            moved = False
            read_caller = not caller_gone and len(inbox) < _INBOX_MOST and \
                len(to_engine) < _HIGH_WATER
            read_engine = not engine_done and len(to_caller) < _HIGH_WATER
            if read_caller:
                got = _recv(caller)
                if got == b"":
                    caller_gone = True
                elif got:
                    inbox += got
                    moved = True
            if read_engine:
                got = _recv(engine)
                if got == b"":
                    engine_done = True
                    code = exit_code()
                    told = code is not None
                    to_caller += fr.frame(fr.EXIT, b"" if code is None else str(code).encode())
                elif got:
                    to_caller += got
                    bounds.feed(got)
                    moved = True
            if not to_caller and bounds.between() and time.monotonic() - last_sent > alive:
                to_caller += fr.frame(fr.STDOUT)
            try:
                if _send(caller, to_caller):
                    moved, last_sent = True, time.monotonic()
            except (ConnectionError, ssl.SSLError):
                caller_gone = True  # reset, or its TLS closed: as gone as a clean close
            moved |= _send(engine, to_engine)
            if caller_gone and not engine_done:
                log.info("%s: the caller left before the command ended; it runs on, its "
                         "output dropped, until it ends or its container's lease does", what)
            if caller_gone or (engine_done and not to_caller):
                return told and not to_caller and not caller_gone
            if not serving():
                return False
            if not moved:
                _wait(selector, caller, engine, to_engine, to_caller,
                      read_caller and not caller_gone, read_engine and not engine_done)
    except fr.FrameError as err:
        log.info("exec stream closed: %s", err)
        return False
    finally:
        selector.close()


def _recv(sock: socket.socket) -> bytes | None:
    """Bytes, b"" at the end, None when nothing is there now."""
    try:
        return sock.recv(_BLOCK)
    except _WOULD_BLOCK:
        return None
    except (ConnectionError, ssl.SSLError):
        return b""


def _send(sock: socket.socket, box: bytearray) -> bool:
    moved = False
    while box:
        try:
            with memoryview(box) as view:  # no copy of what is sent
                sent = sock.send(view[:_BLOCK])
        except _WOULD_BLOCK:
            break
        if not sent:
            break
        del box[:sent]
        moved = True
    return moved


def _shut_write(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_WR)
    except OSError:
        pass


def _wait(selector: selectors.BaseSelector, caller: socket.socket, engine: socket.socket,
          to_engine: bytearray, to_caller: bytearray, read_caller: bool,
          read_engine: bool) -> None:
    """Until a socket we would read has bytes, or one we write to has room (at most half a
    second): one we would not read now is not watched, else it would wake us at once."""
    if read_caller and isinstance(caller, ssl.SSLSocket) and caller.pending():
        return
    wanted = {caller: (selectors.EVENT_READ if read_caller else 0) |
              (selectors.EVENT_WRITE if to_caller else 0),
              engine: (selectors.EVENT_READ if read_engine else 0) |
              (selectors.EVENT_WRITE if to_engine else 0)}
    for sock, events in wanted.items():
        key = selector.get_map().get(sock.fileno())
        if events and key is None:
            selector.register(sock, events)
        elif events:
            selector.modify(sock, events)
        elif key is not None:
            selector.unregister(sock)
    selector.select(0.5)
