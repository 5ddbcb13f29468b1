"""Who may run work here: the allowlist, invites, and the nonces already seen."""

from __future__ import annotations

import hashlib
import logging
import re
import secrets
import sqlite3
import threading
import time
import unicodedata
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from p2prc_core.errors import Refusal
from p2prc_core.identity import b64decode, b64encode, canonical_json, is_node_id
from p2prc_core.models import loads_strict, looks_like_address
from p2prc_core.peertable import PeerTable
from p2prc_core.records import RecordError, verify_record
from p2prc_core.storage import SERVER_DB, SharedDB, read_json_object, update_json
from p2prc_core.text import clean
from p2prc_core.wire import JoinRequest

log = logging.getLogger("p2prc.trust")

TRUSTED_FILE = "trusted.json"
TOKEN_PREFIX = "p2prc-invite-"


class TrustError(Refusal):
    """A trust operation that cannot be done; the message says why (403 from the server)."""

    status = 403
    title = "Invite refused"


def name_problem(name: str) -> str | None:
    """Why ``name`` cannot name a trusted node (None: it can). One rule for the host's own
    names and a joiner's suggestion (``wire.JoinRequest.NAME``): one word a terminal and a
    page show as it is, never a node id or an address (those are looked up as such)."""
    if not JoinRequest.NAME.fullmatch(name):
        return JoinRequest.HINTS["name"]
    if is_node_id(name.lower()) or looks_like_address(name):
        return "a name may not be a node id or an address"
    return None


def checked_name(name: str) -> str:
    """A name the user typed, stripped; "" stays "" (no name).

    :raises TrustError: it breaks the rule (``name_problem``).
    """
    name = name.strip()
    problem = name_problem(name) if name else None
    if problem:
        raise TrustError(f"{name!r} cannot be a name: {problem}")
    return name


def suggested_name(text: object) -> str:
    """Free text (a host name, a peer's record name) made into a name that keeps the rule:
    accents dropped, spaces and dots to '-', anything else left out, cut to length; "" when
    nothing usable is left. What a peer suggests is never kept as it came."""
    if not isinstance(text, str):
        return ""
    shown = clean(text[:256])  # escape sequences go whole, not as their letters
    plain = unicodedata.normalize("NFKD", shown).encode("ascii", "ignore").decode()
    word = re.sub(r"[\s.]+", "-", plain.strip())
    word = re.sub(r"[^A-Za-z0-9_-]", "", word).lstrip("_-")
    word = word[:JoinRequest.MAX_NAME].rstrip("_-")
    return word if word and name_problem(word) is None else ""


@dataclass(frozen=True)
class Trusted:
    """A node trusted here: the name it is trusted under ("" for none), since when, and how
    (``trust``, ``invite``)."""

    name: str
    since: float | None
    via: str

    @classmethod
    def from_json(cls, data: Any) -> Trusted:
        """An entry of ``trusted.json`` (the user may have edited it: each field checked)."""
        data = data if isinstance(data, dict) else {}
        name, since, via = data.get("name"), data.get("since"), data.get("via")
        return cls(name=name if isinstance(name, str) else "",
                   since=since if isinstance(since, int | float) and
                   not isinstance(since, bool) else None,
                   via=via if isinstance(via, str) else "")


class TrustStore:
    """The allowlist: ``$P2PRC_HOME/trusted.json``, node id -> who and since when.

    Re-read when the file changes, so ``p2prc trust`` takes effect on a running server.
    """

    def __init__(self, home: Path):
        self.path = home / TRUSTED_FILE
        self._cache: tuple[float, int, dict[str, Trusted]] | None = None
        self._lock = threading.Lock()

    def all(self) -> dict[str, Trusted]:
        """Every node trusted here, by node id."""
        try:
            stat = self.path.stat()
        except FileNotFoundError:
            return {}
        with self._lock:
            key = (stat.st_mtime, stat.st_size)
            if self._cache is None or self._cache[:2] != key:
                self._cache = (*key, {node_id: Trusted.from_json(entry) for node_id, entry
                                      in read_json_object(self.path).items()})
            return dict(self._cache[2])

    def names(self) -> dict[str, str]:
        """The name each trusted node is trusted under ("" for none), by node id."""
        return {node_id: t.name for node_id, t in self.all().items()}

    def is_trusted(self, node_id: str) -> bool:
        return node_id in self.all()

    def add(self, node_id: str, name: str = "", via: str = "trust") -> bool:
        """Trust ``node_id``; returns False if it already was."""
        if not is_node_id(node_id):
            raise TrustError(f"{node_id!r} is not a node id (26 letters and digits, as "
                             f"'p2prc id' prints)")

        def add(data: dict[str, Any]) -> bool:
            if node_id in data:
                return False
            data[node_id] = {"name": name, "since": int(time.time()), "via": via}
            return True

        return update_json(self.path, add)

    def rename(self, node_id: str, name: str) -> bool:
        """Trust ``node_id`` under ``name`` from now on; False if it is not trusted here."""
        def rename(data: dict[str, Any]) -> bool:
            entry = data.get(node_id)
            if not isinstance(entry, dict):
                return False
            entry["name"] = name
            return True

        return update_json(self.path, rename)

    def remove(self, node_id: str) -> bool:
        return update_json(self.path, lambda data: data.pop(node_id, None) is not None)

    def name_for(self, node_id: str, name: str) -> str:
        """``name`` made unique among the names other trusted nodes have here (letter case
        aside): ``bob``, else ``bob-2``, ``bob-3``, ...; "" stays ""."""
        return _unique(name, {t.name for other, t in self.all().items() if other != node_id})

    def users_name(self, node_id: str, name: str) -> str:
        """A name the user gives ``node_id`` ("" for none: no new node), checked: the rule,
        and no other node trusted here has it. Returns it stripped.

        :raises TrustError: it breaks the rule or names another node already.
        """
        name = checked_name(name)
        if name and self.name_for(node_id, name) != name:
            raise TrustError(f"{name!r} already names another node trusted here ('p2prc "
                             f"trust' lists them): choose another name")
        return name

    def admit(self, node_id: str, chosen: str, suggested: str,
              users_names: Collection[str] = ()) -> str:
        """Trust ``node_id`` on redeeming an invite. Its name: ``chosen`` (the host's, bound
        to the invite) wins; else the name the host gave it before; else ``suggested`` (the
        joiner's), made unique, also against ``users_names`` (the names the user gave peers
        of the table: a joiner's word never shadows one). Returns the name it is trusted
        under ("" for none)."""
        def admit(data: dict[str, Any]) -> str:
            taken = {Trusted.from_json(e).name for other, e in data.items() if other != node_id}
            name = _unique(chosen, taken) if chosen else \
                _unique(suggested, taken | set(users_names))
            entry = data.get(node_id)
            if isinstance(entry, dict):
                kept = entry.get("name")
                if chosen or not (isinstance(kept, str) and kept):
                    entry["name"] = name
                return str(entry["name"])
            data[node_id] = {"name": name, "since": int(time.time()), "via": "invite"}
            return name

        return update_json(self.path, admit)


def _unique(name: str, taken: set[str]) -> str:
    """``name``, else ``name-2``, ``name-3``, ...: the first that no name in ``taken`` is
    (letter case aside); "" stays ""."""
    if not name:
        return ""
    lowered = {t.lower() for t in taken}
    found, count = name, 1
    while found.lower() in lowered:
        count += 1
        tail = f"-{count}"
        found = name[:JoinRequest.MAX_NAME - len(tail)] + tail
    return found


@dataclass(frozen=True)
class Invite:
    """What an invite token carries: where the host is, who it is, and a one-time secret."""

    node_id: str
    addresses: list[str]
    port: int
    secret: str
    expires: int

    def token(self) -> str:
        return TOKEN_PREFIX + b64encode(canonical_json(
            {"n": self.node_id, "a": self.addresses, "p": self.port, "s": self.secret,
             "e": self.expires}))

    @classmethod
    def parse(cls, token: str) -> Invite:
        token = token.strip()
        if not token.startswith(TOKEN_PREFIX):
            raise TrustError(f"not an invite token: it should start with {TOKEN_PREFIX!r}")
        try:
            data = loads_strict(b64decode(token[len(TOKEN_PREFIX):]))
            invite = cls(str(data["n"]), [str(a) for a in data["a"]], int(data["p"]),
                         str(data["s"]), int(data["e"]))
        except (ValueError, KeyError, TypeError):
            raise TrustError("the invite token is damaged: copy it again, whole") from None
        if not is_node_id(invite.node_id) or not invite.addresses:
            raise TrustError("the invite token is damaged: copy it again, whole")
        return invite


def _secret_hash(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


class ServerState:
    """State that every gunicorn worker and the CLI share, and that outlives a restart.

    SQLite in WAL mode in the home: the nonces seen inside the clock window, and invites.
    """

    SCHEMA = """
        CREATE TABLE IF NOT EXISTS nonces (node_id TEXT NOT NULL, nonce TEXT NOT NULL,
            expires REAL NOT NULL, PRIMARY KEY (node_id, nonce));
        CREATE INDEX IF NOT EXISTS nonces_expires ON nonces (expires);
        CREATE TABLE IF NOT EXISTS invites (secret_hash TEXT PRIMARY KEY,
            created REAL NOT NULL, expires REAL NOT NULL, used_by TEXT, used_at REAL);
        CREATE TABLE IF NOT EXISTS invite_names (secret_hash TEXT PRIMARY KEY,
            name TEXT NOT NULL);
    """

    def __init__(self, home: Path):
        self.shared = SharedDB(home / SERVER_DB, self.SCHEMA)
        self.path = self.shared.path

    def _db(self) -> sqlite3.Connection:
        return self.shared.db()

    def use_nonce(self, node_id: str, nonce: str, keep_seconds: float,
                  now: float | None = None) -> bool:
        """Record a nonce for ``keep_seconds``; False when it was already used inside that
        time (a replay)."""
        now = time.time() if now is None else now
        db = self._db()
        try:
            db.execute("INSERT INTO nonces VALUES (?, ?, ?)", (node_id, nonce, now + keep_seconds))
        except sqlite3.IntegrityError:
            row = db.execute("SELECT expires FROM nonces WHERE node_id=? AND nonce=?",
                             (node_id, nonce)).fetchone()
            if row and row[0] >= now:
                return False
            db.execute("UPDATE nonces SET expires=? WHERE node_id=? AND nonce=?",
                       (now + keep_seconds, node_id, nonce))
        if secrets.randbelow(64) == 0:
            db.execute("DELETE FROM nonces WHERE expires < ?", (now,))
        return True

    def create_invite(self, ttl: float, name: str = "") -> tuple[str, int]:
        """A new one-time secret, binding ``name`` (the host's name for whoever redeems it;
        "" for none); returns it and when it expires."""
        secret = b64encode(secrets.token_bytes(24))
        now = time.time()
        expires = int(now + ttl)
        with self.shared.transaction() as db:
            db.execute("INSERT INTO invites VALUES (?, ?, ?, NULL, NULL)",
                       (_secret_hash(secret), now, expires))
            if name:
                db.execute("INSERT INTO invite_names VALUES (?, ?)", (_secret_hash(secret), name))
        return secret, expires

    def redeem_invite(self, secret: str, node_id: str) -> str:
        """Use an invite once; returns the name it binds ("" for none).

        :raises TrustError: unknown, expired or already used.
        """
        now = time.time()
        db = self._db()
        changed = db.execute(
            "UPDATE invites SET used_by=?, used_at=? WHERE secret_hash=? AND used_by IS NULL "
            "AND expires >= ?", (node_id, now, _secret_hash(secret), now)).rowcount
        if changed == 1:
            bound = db.execute("SELECT name FROM invite_names WHERE secret_hash=?",
                               (_secret_hash(secret),)).fetchone()
            return str(bound[0]) if bound else ""
        row = db.execute("SELECT expires, used_by FROM invites WHERE secret_hash=?",
                         (_secret_hash(secret),)).fetchone()
        if row is None:
            raise TrustError("this invite is not known here: ask for a new one")
        if row[1] is not None:
            raise TrustError("this invite was already used: each invite works once; ask "
                             "for a new one")
        raise TrustError("this invite has expired: ask for a new one")

    def invites(self) -> list[dict[str, Any]]:
        rows = self._db().execute("SELECT created, expires, used_by, used_at FROM invites "
                                  "ORDER BY created").fetchall()
        return [{"created": r[0], "expires": r[1], "used_by": r[2], "used_at": r[3]}
                for r in rows]


def accept_invite(state: ServerState, trust: TrustStore, table: PeerTable, caller: str,
                  secret: str, caller_record: Any, suggested: str = "") -> str:
    """Redeem an invite for ``caller`` (a verified signer): trust it, and learn its record if
    it sent a valid one of its own. Its name: the one the invite binds, else one the host
    gave it before, else what it suggests (``suggested``, checked on the wire; else its
    record's name), cleaned and made unique. Returns the name it is trusted under.

    :raises TrustError: the invite is unknown, used or expired.
    """
    chosen = state.redeem_invite(secret, caller)
    record_name = ""
    if caller_record is not None:
        try:
            verify_record(caller_record)
            if caller_record["node_id"] == caller:
                record_name = caller_record["name"]
                table.merge([caller_record], verified=True)  # checked once, just above
        except RecordError as err:
            log.info("join from %s: its record was not kept: %s", caller, err)
    users_names = {e.local_name for other, e in table.load().items()
                   if e.local_name and other != caller} if table.path.exists() else set()
    name = trust.admit(caller, chosen, suggested_name(suggested or record_name), users_names)
    log.info("node %s (%s) joined with an invite and is now trusted", caller, name or "?")
    return name
