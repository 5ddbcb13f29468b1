"""TLS between peers, bound to node identity.

A node's certificate is self-signed by its own Ed25519 node key: the key in the certificate
*is* the node key, so the node id follows from it (``identity.node_id_for``). TLS 1.3 makes
the server prove that it holds that key (CertificateVerify) during the handshake. A client
does not look at names, dates or issuers; right after the handshake, before it sends a byte
of its request, it checks that the key presented is the key of the node it meant to reach
(``check_peer``). The certificate is deterministic (fixed serial, dates, Ed25519), so its
fingerprint is stable and ``p2prc id`` can print it.
"""

from __future__ import annotations

import hashlib
import ssl
import time
from pathlib import Path
from typing import Any

from p2prc_core.errors import PeerError
from p2prc_core.identity import KEY_FILE, NodeIdentity, node_id_for

CERT_FILE = "node.crt"


class NodeMismatch(PeerError):
    """The peer presented another node's key than the one we meant to reach."""

    def __init__(self, where: object, expected: str, presented: str):
        super().__init__(
            f"{where} presented node {presented}, not {expected}, the node this client meant "
            f"to reach: nothing was sent. If {expected} changed its key (or another node now "
            f"has that address), 'p2prc peers rm {expected}' forgets the old one, or use "
            f"{presented}@ADDRESS to reach the new one.")
        self.expected = expected
        self.presented = presented


def certificate(identity: NodeIdentity) -> bytes:
    """This node's certificate (PEM), self-signed by its node key; the same every time."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import serialization
    from cryptography.x509.oid import NameOID

    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, identity.node_id),
                      x509.NameAttribute(NameOID.ORGANIZATION_NAME, "p2prc node")])
    serial = int.from_bytes(hashlib.sha256(identity.public_key).digest()[:16], "big") >> 1
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(identity.private_key.public_key()).serial_number(serial)
            .not_valid_before(datetime.datetime(2000, 1, 1, tzinfo=datetime.UTC))
            .not_valid_after(datetime.datetime(9999, 12, 31, tzinfo=datetime.UTC))
            .sign(identity.private_key, None))
    return cert.public_bytes(serialization.Encoding.PEM)


def fingerprint(cert_pem: bytes) -> str:
    """SHA-256 of the certificate's DER bytes, as ``SHA256:hex``."""
    der = ssl.PEM_cert_to_DER_cert(cert_pem.decode("ascii"))
    return "SHA256:" + hashlib.sha256(der).hexdigest()


def server_files(home: Path, identity: NodeIdentity) -> tuple[Path, Path]:
    """The certificate and key files a TLS server loads: the node key itself (PKCS8 PEM,
    0600) and its certificate, written next to it when missing or stale."""
    cert_path = home / CERT_FILE
    pem = certificate(identity)
    try:
        current = cert_path.read_bytes()
    except FileNotFoundError:
        current = b""
    if current != pem:
        from p2prc_core.storage import atomic_write

        atomic_write(cert_path, pem, mode=0o644)
    return cert_path, home / KEY_FILE


class TimedReads:
    """What an accepted connection keeps, TLS or plain (a mixin over the socket class): its
    timeout, which gunicorn's gthread worker would clear with ``setblocking(True)`` before
    each request on a kept-alive connection (a client that stops half-way would then hold
    a thread for ever); and, with a ``deadline`` (the server's front sets one for each
    request it hands to a thread), reads that wait only for what is left of it, each byte
    read moving it on at ``BODY_RATE``: a client that drips its body is cut off there, not
    after a timeout per byte."""

    socket_timeout = 30.0
    deadline: float | None = None

    def setblocking(self, flag: bool) -> None:
        super().setblocking(flag)  # type: ignore[misc]
        if flag:
            self.settimeout(self.socket_timeout)  # type: ignore[attr-defined]

    def _before_read(self) -> None:
        if self.deadline is not None:
            self.settimeout(time_left(self.deadline,  # type: ignore[attr-defined]
                                      self.socket_timeout))

    def _after_read(self, got: Any) -> None:
        if self.deadline is not None:
            self.deadline += earned(got)


class _TimedSocket(TimedReads, ssl.SSLSocket):
    """An accepted TLS connection (see ``TimedReads``): every read goes through ``read``."""

    def read(self, len: int = 1024, buffer: Any = None) -> Any:
        self._before_read()
        got = super().read(len, buffer)
        self._after_read(got)
        return got


# A request's body must come at this rate at least, on average: each byte read moves the
# request's deadline on by 1/BODY_RATE s (a declared length earns nothing).
BODY_RATE = 64 << 10


def earned(got: Any) -> float:
    """Seconds that what a read returned (bytes, or a count) adds to the deadline."""
    count = got if isinstance(got, int) else len(got)
    return count / BODY_RATE


def time_left(deadline: float, most: float) -> float:
    """Seconds until ``deadline``, at most ``most``.

    :raises TimeoutError: the deadline has passed.
    """
    left = deadline - time.monotonic()
    if left <= 0:
        raise TimeoutError("the request did not arrive in time")
    return min(most, left)


class _ServerContext(ssl.SSLContext):
    """Gives every accepted connection a socket timeout, before its handshake and for every
    read after: gunicorn's threads otherwise wait for ever on a client that sends one byte
    and stops, and a few such connections take every thread."""

    socket_timeout = 30.0

    def wrap_socket(self, sock: Any, *args: Any, **kwargs: Any) -> ssl.SSLSocket:
        sock.settimeout(self.socket_timeout)
        wrapped = super().wrap_socket(sock, *args, **kwargs)
        wrapped.socket_timeout = self.socket_timeout  # type: ignore[attr-defined]
        return wrapped


def server_context(cert_path: Path, key_path: Path,
                   socket_timeout: float = 30.0) -> ssl.SSLContext:
    """TLS 1.3 only; no client certificates (callers prove who they are by signing); a
    connection that stalls for ``socket_timeout`` seconds is dropped."""
    context = _ServerContext(ssl.PROTOCOL_TLS_SERVER)
    context.socket_timeout = socket_timeout
    context.sslsocket_class = _TimedSocket
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    context.load_cert_chain(certfile=str(cert_path), keyfile=str(key_path))
    context.set_alpn_protocols(["http/1.1"])
    return context


_CLIENT_CONTEXT: ssl.SSLContext | None = None


def client_context() -> ssl.SSLContext:
    """TLS 1.3 only. Names, dates and issuers are not checked: ``check_peer`` checks the one
    thing that matters, the node key, right after the handshake."""
    global _CLIENT_CONTEXT
    if _CLIENT_CONTEXT is None:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.minimum_version = ssl.TLSVersion.TLSv1_3
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        context.set_alpn_protocols(["http/1.1"])
        _CLIENT_CONTEXT = context
    return _CLIENT_CONTEXT


def presented_node(ssl_object: Any, where: object) -> str:
    """The node id of the key the peer's certificate carries.

    :raises PeerError: no certificate, or a key that is not an Ed25519 node key.
    """
    der = ssl_object.getpeercert(True) if ssl_object is not None else None  # binary form
    if not der:
        raise PeerError(f"{where} presented no certificate: not a p2prc node")
    try:
        key = certificate_key(der)
    except ValueError:
        raise PeerError(f"{where} presented a certificate that cannot be read") from None
    if key is None:
        raise PeerError(f"{where} presented a certificate without a node key: not a p2prc "
                        f"node (or something in between)")
    return node_id_for(key)


# A SubjectPublicKeyInfo's contents for Ed25519 (RFC 8410): the algorithm, then a bit string
# of the 32-byte key.
_ED25519_INFO = bytes.fromhex("300506032b6570032100")


def certificate_key(der: bytes) -> bytes | None:
    """The Ed25519 key (32 bytes) of the X.509 certificate ``der``, found by walking its
    structure to the subject's public key info; None for a key of another kind. (Loading
    cryptography's X.509 module costs a tunnel helper more than its whole connection.)

    :raises ValueError: not DER, or not shaped as a certificate.
    """
    tag, start, end = _element(der, 0)
    if tag != 0x30 or end != len(der):
        raise ValueError("not a certificate")
    tag, at, tbs_end = _element(der, start)  # TBSCertificate
    if tag != 0x30:
        raise ValueError("not a certificate")
    if _element(der, at)[0] == 0xA0:  # [0] version
        at = _element(der, at)[2]
    # serialNumber, signature, issuer, validity, subject
    for expected in (0x02, 0x30, 0x30, 0x30, 0x30):
        tag, _, at = _element(der, at)
        if tag != expected or at > tbs_end:
            raise ValueError("not a certificate")
    tag, start, end = _element(der, at)  # subjectPublicKeyInfo
    if tag != 0x30 or end > tbs_end:
        raise ValueError("not a certificate")
    _rest_is_a_certificate(der, end, tbs_end)
    info = der[start:end]
    if len(info) != len(_ED25519_INFO) + 32 or not info.startswith(_ED25519_INFO):
        return None
    return bytes(info[len(_ED25519_INFO):])


def _rest_is_a_certificate(der: bytes, at: int, tbs_end: int) -> None:
    """After the key info: the optional issuer and subject unique ids and extensions, in
    that order, to the signed part's end; then the signature's algorithm and value to the
    certificate's. (OpenSSL refuses anything else in a handshake; this keeps the walk from
    taking a key info out of place, were it ever given bytes OpenSSL had not read.)

    :raises ValueError: anything else there.
    """
    for optional in (0x81, 0x82, 0xA3):
        if at < tbs_end and der[at] == optional:
            at = _element(der, at)[2]
    if at != tbs_end:
        raise ValueError("not a certificate")
    tag, _, at = _element(der, at)
    if tag != 0x30:
        raise ValueError("not a certificate")
    tag, _, at = _element(der, at)
    if tag != 0x03 or at != len(der):
        raise ValueError("not a certificate")


def _element(der: bytes, at: int) -> tuple[int, int, int]:
    """The DER element at ``at``: its tag, where its contents start and where they end."""
    if at + 2 > len(der):
        raise ValueError("truncated")
    tag, length = der[at], der[at + 1]
    at += 2
    if length & 0x80:
        count = length & 0x7F
        if not 0 < count <= 4 or at + count > len(der):
            raise ValueError("bad length")
        length = int.from_bytes(der[at:at + count], "big")
        at += count
    if at + length > len(der):
        raise ValueError("truncated")
    return tag, at, at + length


def check_peer(ssl_object: Any, expected: str | None, where: object) -> str:
    """Check the peer's key right after the handshake; returns the node id it presented.

    :raises NodeMismatch: ``expected`` is set and the peer is another node.
    """
    presented = presented_node(ssl_object, where)
    if expected is not None and presented != expected:
        raise NodeMismatch(where, expected, presented)
    return presented
