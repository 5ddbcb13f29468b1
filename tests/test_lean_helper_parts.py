"""The parts the tunnel helper uses instead of heavier libraries (issue 27): the node key read
without cryptography's serialization module, the peer's key found in its certificate without
its X.509 module, and the upgrade request written and a 101 read without h11. Each is held
against the library it stands in for, and tried with what an attacker would send."""

from __future__ import annotations

import asyncio
import datetime
import json
import random
from typing import Any

import pytest
from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509.oid import NameOID
from hypothesis import given, settings
from hypothesis import strategies as st

from p2prc_core import tls
from p2prc_core.errors import PeerError, PeerRefused
from p2prc_core.identity import IdentityError, NodeIdentity, _pem
from p2prc_core.upgrade_client import request_bytes, upgrade_async, upgrade_sync

PKCS8 = (serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
         serialization.NoEncryption())


def cert_der(subject_key: object, signer: object, extension: bytes | None = None) -> bytes:
    """A self-made certificate of ``subject_key``, signed by ``signer``, with an optional
    unknown extension holding ``extension``."""
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "someone")])
    builder = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
               .public_key(subject_key.public_key())  # type: ignore[attr-defined]
               .serial_number(7)
               .not_valid_before(datetime.datetime(2000, 1, 1, tzinfo=datetime.UTC))
               .not_valid_after(datetime.datetime(2100, 1, 1, tzinfo=datetime.UTC)))
    if extension is not None:
        builder = builder.add_extension(x509.UnrecognizedExtension(
            x509.ObjectIdentifier("1.3.6.1.4.1.55555.1"), extension), critical=False)
    algorithm = None if isinstance(signer, ed25519.Ed25519PrivateKey) else hashes.SHA256()
    cert = builder.sign(signer, algorithm)  # type: ignore[arg-type]
    return cert.public_bytes(serialization.Encoding.DER)


def library_key(der: bytes) -> bytes | None:
    key = x509.load_der_x509_certificate(der).public_key()
    if not isinstance(key, ed25519.Ed25519PublicKey):
        return None
    return key.public_bytes_raw()


# -- the node key ------------------------------------------------------------------------------

def test_the_key_file_is_written_as_cryptography_writes_it_and_read_back(tmp_path) -> None:
    for _ in range(20):
        key = ed25519.Ed25519PrivateKey.generate()
        assert _pem(key) == key.private_bytes(*PKCS8)
    made = NodeIdentity.load_or_create(tmp_path)
    written = serialization.load_pem_private_key((tmp_path / "node.key").read_bytes(), None)
    assert isinstance(written, ed25519.Ed25519PrivateKey)
    assert written.public_key().public_bytes_raw() == made.public_key


@pytest.mark.parametrize("dress", [lambda pem: b"a note someone left\n" + pem,
                                   lambda pem: pem.replace(b"\n", b"\r\n")])
def test_a_key_written_another_way_is_still_read(tmp_path, dress: Any) -> None:
    """A key file someone edited (a note above it, Windows line ends): read as before."""
    key = ed25519.Ed25519PrivateKey.generate()
    (tmp_path / "node.key").write_bytes(dress(key.private_bytes(*PKCS8)))
    assert NodeIdentity.load_or_create(tmp_path).public_key == \
        key.public_key().public_bytes_raw()


@pytest.mark.parametrize("text", [
    b"-----BEGIN PRIVATE KEY-----\nMC4CAQAwBQYDK2VwBCIEI!!!\n-----END PRIVATE KEY-----\n",
    b"-----BEGIN PRIVATE KEY-----\nMC4CAQAwBQYDK2VwBCIEIA==\n-----END PRIVATE KEY-----\n",
])
def test_a_broken_key_file_is_a_clear_error(tmp_path, text: bytes) -> None:
    (tmp_path / "node.key").write_bytes(text)
    with pytest.raises(IdentityError, match="cannot read the node key"):
        NodeIdentity.load_or_create(tmp_path)


def test_a_key_of_another_kind_is_refused(tmp_path) -> None:
    (tmp_path / "node.key").write_bytes(ec.generate_private_key(ec.SECP256R1()).private_bytes(
        *PKCS8))
    with pytest.raises(IdentityError, match="not an Ed25519 key"):
        NodeIdentity.load_or_create(tmp_path)


# -- the peer's key in its certificate -------------------------------------------------------

def test_a_nodes_certificate_gives_its_key_as_x509_does() -> None:
    for _ in range(10):
        node = NodeIdentity.generate()
        der = ssl_der(tls.certificate(node))
        assert tls.certificate_key(der) == library_key(der) == node.public_key


def ssl_der(pem: bytes) -> bytes:
    import ssl

    return ssl.PEM_cert_to_DER_cert(pem.decode())


def test_a_decoy_key_elsewhere_in_the_certificate_is_not_taken_for_its_key() -> None:
    """Mallory's certificate carries Alice's key info, byte for byte, in an extension (and
    is signed by Mallory, whose key the handshake proves): the key found is Mallory's."""
    alice, mallory = NodeIdentity.generate(), ed25519.Ed25519PrivateKey.generate()
    decoy = bytes.fromhex("302a300506032b6570032100") + alice.public_key
    der = cert_der(mallory, mallory, extension=decoy)
    assert decoy in der
    assert tls.certificate_key(der) == mallory.public_key().public_bytes_raw()
    # With an ECDSA key of its own, no node key at all, not Alice's.
    other = ec.generate_private_key(ec.SECP256R1())
    assert tls.certificate_key(cert_der(other, other, extension=decoy)) is None


def tlv(tag: int, body: bytes) -> bytes:
    size = len(body)
    length = bytes([size]) if size < 128 else \
        bytes([0x80 | ((size.bit_length() + 7) // 8)]) + size.to_bytes((size.bit_length() + 7) // 8,
                                                                         "big")
    return bytes([tag]) + length + body


def parts(der: bytes, at: int, end: int) -> list[bytes]:
    found = []
    while at < end:
        _, _, after = tls._element(der, at)
        found.append(der[at:after])
        at = after
    return found


def test_a_key_info_out_of_its_place_is_refused() -> None:
    """Alice's key info put before the real one (or where the subject goes): OpenSSL
    refuses such a certificate in a handshake, and the walk never takes the decoy."""
    mallory, alice = NodeIdentity.generate(), NodeIdentity.generate()
    der = ssl_der(tls.certificate(mallory))
    _, start, end = tls._element(der, 0)
    tbs, algorithm, signature = parts(der, start, end)
    _, start, end = tls._element(tbs, 0)
    fields = parts(tbs, start, end)  # version, serial, algorithm, issuer, validity, subject, key
    decoy = tlv(0x30, bytes.fromhex("300506032b6570032100") + alice.public_key)
    for changed in (fields[:6] + [decoy] + fields[6:], [decoy] + fields[1:]):
        forged = tlv(0x30, tlv(0x30, b"".join(changed)) + algorithm + signature)
        with pytest.raises(ValueError):
            tls.certificate_key(forged)
    swapped = tlv(0x30, tlv(0x30, b"".join(fields[:5] + [decoy] + fields[6:])) + algorithm
                  + signature)
    assert tls.certificate_key(swapped) == mallory.public_key  # the key info's own place
    with pytest.raises(ValueError):  # bytes after the certificate
        tls.certificate_key(der + b"\x00")


@pytest.mark.parametrize("der", [b"", b"\x30", b"\x30\x80", b"\x30\x05\x02\x01\x01",
                                 b"\x30\x84\xff\xff\xff\xff", b"\x04\x00", b"not a cert"])
def test_what_is_not_a_certificate_is_refused(der: bytes) -> None:
    with pytest.raises(ValueError):
        tls.certificate_key(der)


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_a_damaged_certificate_never_yields_another_key(data: st.DataObject) -> None:
    """Bytes changed, cut or added anywhere: the walk refuses, finds no node key, or finds
    the key X.509 finds in the same bytes (where it can read them at all)."""
    der = bytearray(ssl_der(tls.certificate(NodeIdentity.generate())))
    rng = random.Random(data.draw(st.integers(0, 2**32)))
    for _ in range(data.draw(st.integers(1, 4))):
        at = rng.randrange(len(der))
        kind = rng.choice(("flip", "cut", "add"))
        if kind == "flip":
            der[at] ^= 1 << rng.randrange(8)
        elif kind == "cut":
            del der[at:at + rng.randrange(1, 8)]
        else:
            der[at:at] = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 8)))
    try:
        ours = tls.certificate_key(bytes(der))
    except ValueError:
        return
    try:
        theirs = library_key(bytes(der))
    except (ValueError, UnsupportedAlgorithm, x509.InvalidVersion):
        return  # the library cannot read it either (a TLS library would not accept it)
    assert ours in (theirs, None)


def test_the_handshake_check_names_what_it_found() -> None:
    class Peer:
        def __init__(self, der: bytes) -> None:
            self.der = der

        def getpeercert(self, binary: bool) -> bytes:
            return self.der

    node = NodeIdentity.generate()
    good = ssl_der(tls.certificate(node))
    assert tls.check_peer(Peer(good), node.node_id, "a host") == node.node_id
    with pytest.raises(tls.NodeMismatch):
        tls.check_peer(Peer(good), NodeIdentity.generate().node_id, "a host")
    other = ec.generate_private_key(ec.SECP256R1())
    with pytest.raises(PeerError, match="without a node key"):
        tls.check_peer(Peer(cert_der(other, other)), None, "a host")
    with pytest.raises(PeerError, match="cannot be read"):
        tls.check_peer(Peer(good[:-5]), None, "a host")
    with pytest.raises(PeerError, match="no certificate"):
        tls.check_peer(Peer(b""), None, "a host")


# -- the upgrade request and its answer --------------------------------------------------------

def test_the_request_is_what_the_server_reads() -> None:
    data = request_bytes("/v1/containers/ab/tunnel?port=22", "[::1]:8088",
                         {"X-P2PRC-Node": "n" * 26})
    head = data.decode().split("\r\n")
    assert head[0] == "POST /v1/containers/ab/tunnel?port=22 HTTP/1.1"
    assert "Upgrade: p2prc-stream/1" in head and "Connection: Upgrade" in head
    assert "X-P2PRC-Node: " + "n" * 26 in head and data.endswith(b"\r\n\r\n")


@pytest.mark.parametrize("target,headers", [
    ("/v1/x?port=22\r\nX-Evil: 1", {}),
    ("/v1/x y", {}),
    ("/v1/x", {"X-P2PRC-Node": "n\r\nX-Evil: 1"}),
    ("/v1/x", {"X-P2PRC-Node": "nö"}),
    ("/v1/x", {"X-Evil: 1\r\nX": "v"}),
    ("/v1/x", {"X-P2PRC-Node": ""}),
])
def test_a_word_that_would_change_the_request_is_refused(target: str,
                                                         headers: dict[str, str]) -> None:
    with pytest.raises(ValueError, match="not printable ASCII"):
        request_bytes(target, "127.0.0.1:8088", headers)


def answer(*chunks: bytes) -> bytes:
    """What ``upgrade_sync`` makes of a server that sends ``chunks``, then closes."""
    pending = list(chunks)
    return upgrade_sync(lambda: pending.pop(0) if pending else b"", lambda _: None, "a host",
                        "/v1/x", "127.0.0.1:8088", {}, timeout=5)


def test_a_101_gives_the_streams_first_bytes_however_it_arrives() -> None:
    assert answer(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: p2prc-stream/1\r\n\r\nSSH-2")\
        == b"SSH-2"
    assert answer(b"HTTP/1.1 10", b"1 Switching Protocols\r\n", b"\r\n") == b""


NOT_FOUND = json.dumps({"title": "Not found", "description": "no such one"}).encode()


@pytest.mark.parametrize("chunks,error,said", [
    ([b"HTTP/1.1 404 Not Found\r\nContent-Type: application/json\r\nContent-Length: "
      + str(len(NOT_FOUND)).encode() + b"\r\n\r\n" + NOT_FOUND], PeerRefused,
     "refused (404): Not found: no such one"),
    ([b"HTTP/1.1 404 Not Found\r\nContent-Length: " + str(len(NOT_FOUND)).encode()
      + b"\r\n\r\n", NOT_FOUND[:10], NOT_FOUND[10:]], PeerRefused, "Not found: no such one"),
    ([b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"], PeerError, "answered HTTP 200"),
    ([b"HTTP/1.1 100 Continue\r\n\r\n"], PeerError, "answered 100 instead of switching"),
    ([b"SSH-2.0-OpenSSH\r\n"], PeerError, "did not answer as an HTTP server"),
    ([b"HTTP/1.1 101 Switching"], PeerError, "did not answer as an HTTP server"),
    ([], PeerError, "closed the connection without an answer"),
    ([b"HTTP/1.1 500 Oops\r\nContent-Length: 12\r\n\r\n\x1b[2Jnot json"], PeerRefused,
     "refused (500): HTTP 500"),
])
def test_any_other_answer_is_said_plainly(chunks: list[bytes], error: type[Exception],
                                          said: str) -> None:
    with pytest.raises(error) as raised:
        answer(*chunks)
    assert said in str(raised.value) and "\x1b" not in str(raised.value)


def answer_async(*chunks: bytes) -> bytes:
    """What ``upgrade_async`` makes of the same server."""
    pending = list(chunks)

    class Reader:  # the server's answer, one chunk a read, then the end
        async def read(self, _: int) -> bytes:
            return pending.pop(0) if pending else b""

    class Writer:
        def write(self, data: bytes) -> None:
            pass

        async def drain(self) -> None:
            pass

    return asyncio.run(upgrade_async(Reader(), Writer(), "a host",  # type: ignore[arg-type]
                                     "/v1/x", "127.0.0.1:8088", {}, timeout=5))


@pytest.mark.parametrize("read", [answer, answer_async])
def test_a_refusal_whose_head_arrives_in_two_reads_is_a_refusal(read: Any) -> None:
    """A Content-Length seen before the head's end: the rest of the head is waited for."""
    with pytest.raises(PeerRefused, match=r"refused \(403\)"):
        read(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n", b"Server: x\r\n\r\n")


@pytest.mark.parametrize("read", [answer, answer_async])
def test_a_content_length_of_thousands_of_digits_is_a_peer_error(read: Any) -> None:
    """Not a ValueError from int(): the dial ladder and the helper handle a PeerError."""
    with pytest.raises(PeerError):
        read(b"HTTP/1.1 403 F\r\nContent-Length: " + b"9" * 5000 + b"\r\n\r\nhello")


@pytest.mark.parametrize("head", [b"HTTP/1.1 101\r\n\r\n", b"HTTP/1.1 101 \r\n\r\n",
                                  b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: x\r\n\r\n"])
def test_a_101_with_or_without_its_reason_phrase_switches(head: bytes) -> None:
    assert answer(head + b"first") == b"first"
    assert answer_async(head + b"first") == b"first"


def test_an_endless_answer_stops_at_its_limit() -> None:
    head = b"HTTP/1.1 500 Oops\r\nContent-Length: 999999999\r\n\r\n"
    sent = [0]

    def read() -> bytes:
        sent[0] += 1
        return head if sent[0] == 1 else b"x" * 65536

    with pytest.raises(PeerRefused, match=r"refused \(500\): HTTP 500"):
        upgrade_sync(read, lambda _: None, "a host", "/v1/x", "h", {}, timeout=5)
    assert sent[0] <= 3  # 64 KiB at most is read
    head, sent[0] = b"HTTP/1.1 500 Oops\r\nX-Long: ", 0  # a head that never ends
    with pytest.raises(PeerError, match="did not answer as an HTTP server"):
        upgrade_sync(read, lambda _: None, "a host", "/v1/x", "h", {}, timeout=5)
    assert sent[0] <= 3
