"""Who may run work here: the allowlist, invites, and the nonces already seen."""

from __future__ import annotations

import hashlib
import logging
import secrets
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from p2prc_core.errors import Refusal
from p2prc_core.identity import b64decode, b64encode, canonical_json, is_node_id
from p2prc_core.models import loads_strict
from p2prc_core.peertable import PeerTable
from p2prc_core.records import RecordError, verify_record
from p2prc_core.storage import SERVER_DB, SharedDB, read_json_object, update_json

log = logging.getLogger("p2prc.trust")

TRUSTED_FILE = "trusted.json"
TOKEN_PREFIX = "p2prc-invite-"


class TrustError(Refusal):
    """A trust operation that cannot be done; the message says why (403 from the server)."""

    status = 403
    title = "Invite refused"


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

    def create_invite(self, ttl: float) -> tuple[str, int]:
        """A new one-time secret; returns it and when it expires."""
        secret = b64encode(secrets.token_bytes(24))
        now = time.time()
        expires = int(now + ttl)
        self._db().execute("INSERT INTO invites VALUES (?, ?, ?, NULL, NULL)",
                           (_secret_hash(secret), now, expires))
        return secret, expires

    def redeem_invite(self, secret: str, node_id: str) -> None:
        """Use an invite once. :raises TrustError: unknown, expired or already used."""
        now = time.time()
        db = self._db()
        changed = db.execute(
            "UPDATE invites SET used_by=?, used_at=? WHERE secret_hash=? AND used_by IS NULL "
            "AND expires >= ?", (node_id, now, _secret_hash(secret), now)).rowcount
        if changed == 1:
            return
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
                  secret: str, caller_record: Any) -> str:
    """Redeem an invite for ``caller`` (a verified signer): trust it, and learn its record if
    it sent a valid one of its own. Returns the name it is trusted under.

    :raises TrustError: the invite is unknown, used or expired.
    """
    state.redeem_invite(secret, caller)
    name = ""
    if caller_record is not None:
        try:
            verify_record(caller_record)
            if caller_record["node_id"] == caller:
                name = caller_record["name"]
                table.merge([caller_record], verified=True)  # checked once, just above
        except RecordError as err:
            log.info("join from %s: its record was not kept: %s", caller, err)
    trust.add(caller, name=name, via="invite")
    log.info("node %s (%s) joined with an invite and is now trusted", caller, name or "?")
    return name
