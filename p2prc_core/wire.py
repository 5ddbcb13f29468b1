"""The messages peers send each other: one typed definition each, used by the client and
the server alike, checked once where the bytes arrive, and the source of the OpenAPI
document's schemas (``server.openapi``).

Each message is a ``msgspec.Struct``: ``decode`` (bytes) and ``convert`` (parsed JSON) check
its types strictly (no ``true`` for a number, no ``"1"`` for an int) and run its
``__post_init__`` for the rules a type cannot say (the patterns of ``models``). What the
server checks forbids unknown fields; what a client reads from a peer ignores them (a newer
peer may say more). Whatever fails is a ``WireError`` whose text names the field and what it
must be (each message's ``HINTS``), so a front end can show it as it is.

A signed peer record stays a plain dict (``records.verify_record``): its signature covers
exactly the keys it was sent with, which a typed copy would not keep.
"""

from __future__ import annotations

import base64
import hashlib
import re
from typing import Annotated, Any, ClassVar, TypeVar

import msgspec
from msgspec import Meta, Struct, field

from p2prc_core.gossip import DIGEST_CHARS, TOKEN_CHARS
from p2prc_core.models import (
    CONTAINER_ID,
    KEY_LINE,
    MAX_JSON_DEPTH,
    PUBLIC_KEY,
    Address,
    json_depth,
    pin_key,
)
from p2prc_core.sshkeys import login_command
from p2prc_core.text import clean

T = TypeVar("T")

MAX_GPUS = 64  # most GPUs a request may name, and the highest index + 1
MAX_KEY_LINE = 8192  # characters of an SSH key line (a 16,384-bit RSA key takes 2,800)
MAX_TIME = 253402300799  # 9999-12-31: any later time a host sends is no time
MAX_HAVE = 4096  # record tokens in one ``have``, ``want`` or listing
MAX_CURSOR = 64
MAX_LISTED = 10_000  # containers one list answer may hold

# The one rule for a relay's token (``/v1/relay/wait`` hands it out, ``accept`` takes it back):
# client and server use these. (The Upgrade token of every stream, ``models.STREAM_PROTOCOL``,
# is in the lighter module: a tunnel helper reads it without loading these definitions.)
RELAY_TOKEN_BYTES = 16
RELAY_TOKEN = re.compile(f"[0-9a-f]{{{2 * RELAY_TOKEN_BYTES}}}")

_IMAGE_ASKED = re.compile(r"[a-z0-9][a-z0-9._/-]{0,127}(:[A-Za-z0-9_][A-Za-z0-9._-]{0,127})?")
_IMAGE_RUN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._/:@-]{0,255}")
_STATE = re.compile(r"[a-z]{1,20}")
_TOKENS = re.compile(r"[A-Za-z0-9_-]*")  # record tokens and digests: base64url, no padding
_USER = re.compile(r"[a-z_][a-z0-9_-]{0,31}")

Port = Annotated[int, Meta(ge=1, le=65535)]
Time = Annotated[float, Meta(ge=0, le=MAX_TIME)]
GpuIndex = Annotated[int, Meta(ge=0, le=MAX_GPUS - 1)]


class WireError(ValueError):
    """A message that is not what its definition says; the text names the field."""


class NotJSON(WireError):
    """Bytes that are not JSON at all (another kind of server, most likely)."""


def is_relay_token(text: object) -> bool:
    return isinstance(text, str) and RELAY_TOKEN.fullmatch(text) is not None


def host_key_fingerprint(host_key: str) -> str:
    """OpenSSH's SHA256 fingerprint of a public key line."""
    blob = base64.b64decode(host_key.split()[1])
    return "SHA256:" + base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")


# -- checking -----------------------------------------------------------------------------


def convert(value: Any, kind: type[T]) -> T:
    """``value`` (parsed JSON) as a ``kind``, checked.

    :raises WireError: it is not one; the text names the field.
    """
    _refuse_unknown(value, kind)
    try:
        return msgspec.convert(value, kind)
    except msgspec.ValidationError as err:
        raise WireError(_explain(str(err), kind)) from None
    except RecursionError:
        raise WireError(f"nested deeper than {MAX_JSON_DEPTH} levels") from None


def decode(raw: bytes, kind: type[T]) -> T:
    """The JSON ``raw`` as a ``kind``, parsed and checked in one pass (no NaN or Infinity).

    :raises WireError: not JSON, or not a ``kind``; the text says why.
    """
    try:
        return msgspec.json.decode(raw, type=kind)
    except msgspec.ValidationError as err:
        raise WireError(_explain(str(err), kind)) from None
    except msgspec.DecodeError as err:
        raise NotJSON(f"not JSON ({err})") from None
    except RecursionError:
        raise WireError(f"nested deeper than {MAX_JSON_DEPTH} levels") from None


def encode(message: Struct) -> bytes:
    return msgspec.json.encode(message)


def to_builtins(message: Struct | dict[str, Any]) -> Any:
    """The message as plain JSON values (for ``resp.media`` and ``--json``)."""
    return msgspec.to_builtins(message)


def _refuse_unknown(value: Any, kind: type) -> None:
    """Name every unknown field at once (msgspec names the first only)."""
    config = getattr(kind, "__struct_config__", None)
    if config is None or not config.forbid_unknown_fields or not isinstance(value, dict):
        return
    known = set(kind.__struct_encode_fields__)  # type: ignore[attr-defined]
    unknown = sorted(str(k) for k in set(value) - known)
    if unknown:
        raise WireError(f"Unknown fields {unknown}: a request may only carry {sorted(known)}.")


_AT = re.compile(r" - at `\$\.?([A-Za-z_]*)[^`]*`$")
_MISSING = re.compile(r"missing required field `([A-Za-z_]+)`")


def _explain(message: str, kind: type) -> str:
    """msgspec's error as this message's own words for the field (``HINTS``)."""
    hints: dict[str, str] = getattr(kind, "HINTS", {})
    found = _AT.search(message) or _MISSING.search(message)
    name = found.group(1) if found else ""
    if name in hints:
        return hints[name]
    if message.startswith("Expected `object`") and not name:
        return "Expected a JSON object."
    return message  # a __post_init__'s own sentence, or a nested field's path


def _refuse(condition: bool, hint: str) -> None:
    if condition:
        raise ValueError(hint)


# -- containers ---------------------------------------------------------------------------


class ContainerRequest(Struct, frozen=True, forbid_unknown_fields=True):
    """What a caller may ask for (``POST /v1/containers``). Nothing else reaches the engine.

    ``gpu``: False (none), True (every GPU free now, at least one), a count, or the indexes
    of the GPUs wanted (kept as a sorted tuple)."""

    ssh_key: str
    ports: Annotated[int, Meta(ge=0)] = 0
    gpu: bool | Annotated[int, Meta(ge=1, le=MAX_GPUS)] | \
        Annotated[tuple[GpuIndex, ...], Meta(min_length=1, max_length=MAX_GPUS)] = False
    image: str | None = None
    cpus: Annotated[float, Meta(ge=0.01)] | None = None
    memory: Annotated[int, Meta(ge=1, description="bytes")] | None = None
    ttl: Annotated[int, Meta(ge=1, description="seconds")] | None = None

    HINTS: ClassVar[dict[str, str]] = {
        "ssh_key": "ssh_key must be one OpenSSH public key line.",
        "ports": "ports must be a whole number from 0 up.",
        "gpu": f"gpu must be true or false, a count from 1 to {MAX_GPUS}, or a list of "
               f"distinct GPU indexes (0 to {MAX_GPUS - 1}).",
        "image": "image is not a valid image name.",
        "cpus": "cpus must be a number from 0.01 up.",
        "memory": "memory must be a whole number from 1 up.",
        "ttl": "ttl must be a whole number from 1 up.",
    }

    def __post_init__(self) -> None:
        _refuse(len(self.ssh_key) > MAX_KEY_LINE or
                not KEY_LINE.fullmatch(self.ssh_key.strip()), self.HINTS["ssh_key"])
        msgspec.structs.force_setattr(self, "ssh_key", self.ssh_key.strip())
        _refuse(self.image is not None and not _IMAGE_ASKED.fullmatch(self.image),
                self.HINTS["image"])
        if isinstance(self.gpu, tuple | list):
            _refuse(len(set(self.gpu)) != len(self.gpu), self.HINTS["gpu"])
            msgspec.structs.force_setattr(self, "gpu", tuple(sorted(self.gpu)))

    @classmethod
    def from_json(cls, body: Any) -> ContainerRequest:
        """:raises WireError: anything malformed or unknown (the text says what)."""
        return convert(body, cls)


class PortMapping(Struct, frozen=True):
    """One published port of a container: the first is SSH's."""

    name: Annotated[str, Meta(max_length=32)]
    internal: Port
    external: Port


class SshLogin(Struct, frozen=True, omit_defaults=True):
    """How to log in to a container, as its host says it (``ssh`` in a container reply).
    A host of an older p2prc may send only ``port`` and ``host_key``."""

    port: Port
    host_key: str
    user: str | None = None
    host: str | None = None
    fingerprint: str | None = None
    command: str | None = None

    @classmethod
    def of(cls, container_id: str, host: str, port: int, host_key: str,
           direct: bool) -> SshLogin:
        """The block for a container reached at ``host`` (without brackets): the one rule
        for the host that sends it and the client that checks it."""
        return cls(port=port, host_key=host_key, user="root", host=host,
                   fingerprint=host_key_fingerprint(host_key) if host_key else None,
                   command=login_command(host, port) if direct
                   else f"p2prc ssh {container_id[:12]}")

    def completed(self, expected: SshLogin) -> SshLogin:
        """This block, each field it leaves out taken from ``expected``.

        :raises WireError: a field it gives is not the one ``expected`` has (a host may not
            name another address, key or command than the container's own).
        """
        for name in ("port", "host_key", "user", "fingerprint", "command"):
            given, wanted = getattr(self, name), getattr(expected, name)
            if name == "command" and isinstance(given, str) and isinstance(wanted, str):
                given, wanted = given.lower(), wanted.lower()  # a host name, as HTTP sent it
            if given is not None and given != wanted:
                raise WireError(f"its ssh {name} is not the container's")
        if self.host is not None and expected.host is not None and \
                not _same_host(self.host.strip("[]"), expected.host.strip("[]")):
            raise WireError("its ssh host is not the address it was reached at")
        return expected


def _same_host(given: str, expected: str) -> bool:
    """Whether two spellings name one host (``models.pin_key``); the same text is, without
    parsing it (the usual case, and parsing an address is what a create's check spends)."""
    return given == expected or pin_key(given, 1) == pin_key(expected, 1)


class ContainerReply(Struct, frozen=True, omit_defaults=True):
    """A container as its host describes it (the answer to a create, an item of a list):
    where its ports are, and how to log in (``ssh``)."""

    id: str
    image: str
    ports: Annotated[list[PortMapping], Meta(min_length=1, max_length=65)]
    ssh: SshLogin
    created: Time
    expires: Time
    node_id: str | None = None
    gpu: bool = False
    gpus: Annotated[list[GpuIndex], Meta(max_length=MAX_GPUS)] = []
    direct: bool = False  # published on the host's addresses, not loopback only
    owner: str | None = None
    host_key: str | None = None
    cpus: float | None = None
    memory: int | None = None
    state: str | None = None

    HINTS: ClassVar[dict[str, str]] = {
        "id": "its id is not 12 to 64 lower-case hex characters",
        "image": "its image name is malformed",
        "ports": "its ports are malformed",
        "ssh": "its ssh block is malformed",
        "created": "its creation is not a time",
        "expires": "its expiry is not a time",
        "gpus": "its GPUs are not a list of GPU indexes",
        "direct": "'direct' is not true or false",
    }

    def __post_init__(self) -> None:
        _refuse(not CONTAINER_ID.fullmatch(self.id), self.HINTS["id"])
        # A container the host adopted after losing its records has no key on file ("").
        _refuse(bool(self.ssh.host_key) and not PUBLIC_KEY.fullmatch(self.ssh.host_key),
                "its host key is not one OpenSSH public key")
        _refuse(self.ports[0].external != self.ssh.port, self.HINTS["ports"])
        _refuse(not _IMAGE_RUN.fullmatch(self.image), self.HINTS["image"])

    @property
    def state_word(self) -> str:
        """Its state, or ``unknown`` for a word p2prc does not use."""
        return self.state if self.state is not None and _STATE.fullmatch(self.state) \
            else "unknown"


class ContainerList(Struct, frozen=True):
    """``GET /v1/containers``: the caller's containers on this host."""

    containers: Annotated[list[ContainerReply], Meta(max_length=MAX_LISTED)]


class Removed(Struct, frozen=True):
    """``DELETE /v1/containers/{id}``: the id of the container removed."""

    removed: str


# -- the table exchange -------------------------------------------------------------------


class ExchangeRequest(Struct, frozen=True):
    """``POST /v1/peers`` (``GET`` with ``since`` only): the caller's own record, a cursor
    from an earlier answer, what it holds. Unknown fields are ignored (a newer peer)."""

    from_: str | None = field(default=None, name="from")
    records: list[Any] = []  # signed records: each verified on its own, a bad one dropped
    since: Annotated[str, Meta(max_length=MAX_CURSOR)] | None = None
    known_seq: int | None = None  # the seq of our record the caller holds
    limit: Annotated[int, Meta(ge=1)] | None = None
    have: Annotated[str, Meta(max_length=TOKEN_CHARS * MAX_HAVE)] = ""  # (older callers)
    # ``gossip.Versions.digest`` of what the caller knows: the answer lists the tokens of
    # the versions held here in the slices that differ (``ExchangeAnswer.tokens``)
    digest: Annotated[str, Meta(max_length=DIGEST_CHARS)] = ""
    # tokens from such a listing: the answer carries those records (at most ``limit``)
    want: Annotated[str, Meta(max_length=TOKEN_CHARS * MAX_HAVE)] = ""

    HINTS: ClassVar[dict[str, str]] = {
        "from": "'from' must be the caller's node id",
        "records": "'records' must be a list of records",
        "since": "'since' must be a cursor string",
        "known_seq": "'known_seq' must be a whole number",
        "limit": "'limit' must be a positive whole number",
        "have": f"'have' must be {TOKEN_CHARS}-character record tokens, at most {MAX_HAVE} "
                f"of them",
        "digest": f"'digest' must be {DIGEST_CHARS} base64url characters",
        "want": f"'want' must be {TOKEN_CHARS}-character record tokens, at most {MAX_HAVE} "
                f"of them",
    }

    def __post_init__(self) -> None:
        for name in ("have", "want"):
            text = getattr(self, name)
            _refuse(len(text) % TOKEN_CHARS != 0 or not _TOKENS.fullmatch(text),
                    self.HINTS[name])
        _refuse(self.digest != "" and (len(self.digest) != DIGEST_CHARS
                                       or not _TOKENS.fullmatch(self.digest)),
                self.HINTS["digest"])

    def have_tokens(self) -> frozenset[str]:
        """The record tokens in ``have``."""
        return frozenset(self.have[i:i + TOKEN_CHARS]
                         for i in range(0, len(self.have), TOKEN_CHARS))


class ExchangeAnswer(Struct, omit_defaults=True):
    """The answer to an exchange: records changed since the cursor, the next cursor, whether
    more follow, and the answering node's own record when the caller's copy is old."""

    records: list[Any]  # signed records, each verified before it is kept
    cursor: Annotated[str, Meta(max_length=MAX_CURSOR)]
    more: bool = False
    node: dict[str, Any] | None = None
    accepted: int | None = None  # how many of the caller's records were taken
    holds_seq: int | None = None  # the seq of the caller's record held here
    observed: Any = None  # the caller's address as seen here: kept only as an IP address
    # Whether this host would create a container for the (signed) caller now: the rule
    # POST /v1/containers answers 403 by. Only the host's word: a host that says yes and
    # then refuses costs the caller one refusal. Absent for an unsigned caller.
    hosts_you: bool | None = None
    # To a caller that sent a digest: the tokens of the versions held here in the slices
    # where the digests differ ("" for none: both know the same), and in ``more`` whether
    # some were left out. Absent from an older node, which pages by cursor instead.
    tokens: Annotated[str, Meta(max_length=TOKEN_CHARS * MAX_HAVE)] | None = None

    HINTS: ClassVar[dict[str, str]] = {
        "records": "its records are not a list",
        "cursor": f"its cursor is not a string of at most {MAX_CURSOR} characters",
        "hosts_you": "its hosts_you is not true or false",
        "tokens": f"its tokens are not {TOKEN_CHARS}-character record tokens, at most "
                  f"{MAX_HAVE} of them",
    }

    def __post_init__(self) -> None:
        _refuse(json_depth([self.records, self.node]) > MAX_JSON_DEPTH,
                f"nested deeper than {MAX_JSON_DEPTH} levels")
        _refuse(self.tokens is not None and (len(self.tokens) % TOKEN_CHARS != 0
                                             or not _TOKENS.fullmatch(self.tokens)),
                self.HINTS["tokens"])
        observed = self.observed
        self.observed = None  # a peer's word for our address: an IP address, or nothing
        if isinstance(observed, str) and len(observed) <= 64:
            try:
                self.observed = str(Address.parse(observed))
            except ValueError:
                pass


# -- exec streams ---------------------------------------------------------------------------

MAX_ARGV = 4096  # words of one exec's command line


class ExecStart(Struct, frozen=True, forbid_unknown_fields=True):
    """The first frame of an exec stream (``exec_frames.START``): the command line to run in
    the caller's container, as words (never a shell line the host composes), and whether the
    caller sends standard input (without, the command's stdin is closed at once)."""

    argv: Annotated[tuple[str, ...], Meta(min_length=1, max_length=MAX_ARGV)]
    stdin: bool = False
    # The host sends an empty STDOUT frame after this many seconds without a byte, so that
    # the caller can tell a silent command from a host that stopped answering.
    alive: Annotated[float, Meta(ge=0.5, le=600)] = 5.0
    # Remove the container once the command ended and its EXIT frame went out (a caller
    # that has nothing more to do there need not wait for the removal).
    remove: bool = False

    HINTS: ClassVar[dict[str, str]] = {
        "argv": f"argv must be a list of 1 to {MAX_ARGV} words with no NUL character, "
                f"the first not empty.",
        "stdin": "stdin must be true or false.",
        "alive": "alive must be a number of seconds from 0.5 to 600.",
        "remove": "remove must be true or false.",
    }

    def __post_init__(self) -> None:
        _refuse(not self.argv[0] or any("\0" in word for word in self.argv),
                self.HINTS["argv"])


# -- relays -------------------------------------------------------------------------------

# On a listening stream (``POST /v1/relay/listen``) the relay writes a ``RelayWait`` line for
# each client, and an empty line this often: both ends go by it.
LISTEN_KEEPALIVE_SECONDS = 15.0


class RelayWait(Struct, frozen=True):
    """``GET /v1/relay/wait``: the token to accept a waiting client with (204: none came)."""

    token: str

    def __post_init__(self) -> None:
        _refuse(not RELAY_TOKEN.fullmatch(self.token),
                f"a relay token is {2 * RELAY_TOKEN_BYTES} lower-case hex characters")


class ReachAnswer(Struct, frozen=True):
    """``POST /v1/reach``: whether the host could dial the caller back, at which address.
    Its words are kept safe to show (``text.clean``): an address and a reason, no more."""

    reachable: bool
    address: str
    error: str | None = None

    def __post_init__(self) -> None:
        msgspec.structs.force_setattr(self, "address", clean(self.address, 64))
        if self.error is not None:
            msgspec.structs.force_setattr(self, "error", clean(self.error, 200))


class JoinRequest(Struct, frozen=True):
    """``POST /v1/trust/join``: an invite's secret, the caller's own signed record, and the
    name it suggests to be trusted under (the host's own choice wins: ``trust.admit``)."""

    secret: str
    record: Any = None  # one that does not verify is not kept; the join still counts
    # "" for none; else NAME's rule (the host still makes it unique, or keeps its own)
    name: Annotated[str, Meta(pattern=r"^([A-Za-z0-9][A-Za-z0-9_-]{0,31})?$")] = ""

    MAX_NAME: ClassVar[int] = 32
    # The one rule for a name a node is trusted under (``trust.name_problem``): one word of
    # ASCII letters, digits, '-' and '_' (no look-alike letters, no markup, no spaces).
    NAME: ClassVar[re.Pattern[str]] = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,31}")
    HINTS: ClassVar[dict[str, str]] = {
        "secret": 'Expected {"secret": "..."}.',
        "name": "a name is one word of 1 to 32 letters (A-Z, a-z), digits, '-' and '_', "
                "starting with a letter or digit"}

    def __post_init__(self) -> None:
        # The pattern above is for the OpenAPI document; its '$' would pass "bob\n".
        _refuse(self.name != "" and not self.NAME.fullmatch(self.name), self.HINTS["name"])


class JoinAnswer(Struct, frozen=True):
    """The answer to a join: the caller is trusted now, and the host's own signed record
    (kept as sent, for its signature: ``records.verify_record`` checks it)."""

    trusted: bool
    node: dict[str, Any]

    HINTS: ClassVar[dict[str, str]] = {"node": "its record is not an object"}

    def __post_init__(self) -> None:
        _refuse(json_depth([self.node]) > MAX_JSON_DEPTH,
                f"nested deeper than {MAX_JSON_DEPTH} levels")


class PunchOffer(Struct, frozen=True, forbid_unknown_fields=True):
    """``POST /v1/punch``: open a direct UDP path with the caller (``punch``). ``token``
    admits the path at the host's UDP port; ``candidates`` are where the caller's UDP
    comes from (``ADDRESS:PORT``, at most ``punch.MAX_CANDIDATES``, checked by
    ``punch.parse_candidates`` where it is used)."""

    token: Annotated[str, Meta(pattern=r"^[0-9a-f]{32}$")]
    candidates: Annotated[list[Annotated[str, Meta(max_length=64)]],
                          Meta(min_length=1, max_length=8)]

    HINTS: ClassVar[dict[str, str]] = {
        "token": "a punch token is 32 lower-case hex characters",
        "candidates": "candidates are 1 to 8 ADDRESS:PORT of at most 64 characters"}

    def __post_init__(self) -> None:
        _refuse(len(self.token) != 32, self.HINTS["token"])


class PunchAnswer(Struct, frozen=True):
    """The host's side of a punch: where its UDP comes from (checked by the client with
    ``punch.parse_candidates``), and how long it punches toward the caller."""

    candidates: Annotated[list[Annotated[str, Meta(max_length=64)]],
                          Meta(min_length=1, max_length=8)]
    seconds: Annotated[float, Meta(ge=0, le=10)]


# -- open routes and trust ----------------------------------------------------------------


class Health(Struct, frozen=True):
    """``GET /v1/health``: liveness, the server's version, its clock and its uptime (a
    client compares clocks with it). An older peer may leave all but ``status`` out."""

    status: str
    version: str | None = None  # kept to 64 characters, safe to show
    time: Time | None = None
    uptime_seconds: Annotated[float, Meta(ge=0)] | None = None

    def __post_init__(self) -> None:
        if self.version is not None:
            msgspec.structs.force_setattr(self, "version", clean(self.version, 64))


class TrustMe(Struct, frozen=True):
    """``GET /v1/trust/me``: the (signed) caller as the host sees it: trusted or not, and
    the host's trust mode."""

    node_id: str
    trusted: bool
    trust_mode: str


# The messages the OpenAPI document describes, by the name its components use.
DOCUMENTED: tuple[type[Struct], ...] = (
    ContainerRequest, ContainerReply, ContainerList, Removed, ExchangeRequest, ExchangeAnswer,
    RelayWait, ReachAnswer, JoinRequest, JoinAnswer, Health, TrustMe, ExecStart, PunchOffer,
    PunchAnswer)


def schema_components() -> dict[str, Any]:
    """JSON Schemas of every documented message, for ``components.schemas``."""
    _, components = msgspec.json.schema_components(
        DOCUMENTED, ref_template="#/components/schemas/{name}")
    return components


def schema_ref(kind: type[Struct]) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{kind.__name__}"}
