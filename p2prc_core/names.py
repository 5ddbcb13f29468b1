"""What the user types for a peer or a node, to the node it means: the user's own names
first, then node ids and their unique starts, then the names peers chose themselves."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping

from p2prc_core.errors import P2PRCError, PeerError, PeerRefused, UnknownPeer
from p2prc_core.identity import is_node_id
from p2prc_core.models import MIN_PREFIX, looks_like_address, parse_path
from p2prc_core.peertable import PeerEntry, PeerTable
from p2prc_core.text import clean, did_you_mean
from p2prc_core.trust import TrustStore


class PeerNames:
    """Names over the peer table and the trust store (read only)."""

    def __init__(self, table: PeerTable, trust: TrustStore):
        self.table = table
        self.trust = trust

    def find(self, text: str) -> PeerEntry | None:
        """A table entry for PEER; None when nothing in the table matches. In order: text
        that reads as an address is an address, never a name; a node id; a name the user
        gave (``peers add --name``); a unique prefix of a node id (4+ characters); a name a
        peer chose itself, when only one peer has it.

        :raises P2PRCError: the prefix or the name fits several peers.
        """
        if looks_like_address(text) or not self.table.path.exists():
            return None
        peers = self.table.load()
        if text in peers:
            return peers[text]
        mine = [e for e in peers.values() if e.local_name == text]  # the user's names first
        if mine:
            return mine[0]
        by_prefix = _by_prefix(text, peers)
        if by_prefix is not None:
            return peers[by_prefix]
        named = [e for e in peers.values() if e.name == text]
        if len(named) > 1:
            ids = ", ".join(e.node_id for e in named)
            raise P2PRCError(f"{len(named)} peers are named {text!r} ({ids}): use a node "
                             f"id, or name one yourself with 'p2prc peers add ADDRESS "
                             f"--name NAME'")
        return named[0] if named else None

    def label(self, node_id: str | None, fallback: str = "") -> str:
        """What to call a node in a line for people: the user's own name for it (``peers
        add --name``, then ``trust --name``), else the name it gave itself (made safe to
        show), else the start of its id; ``fallback`` (an address) when no node is known."""
        if not node_id:
            return fallback or "?"
        entry = self.table.load().get(node_id) if self.table.path.exists() else None
        if entry is not None and entry.local_name:
            return clean(entry.local_name, 64)
        trusted = self.trust.names().get(node_id)
        if trusted:  # one stored before names were checked may hold anything
            return clean(trusted, 64)
        own = clean(entry.name, 40).strip() if entry is not None else ""
        return own or node_id[:12]

    def path_text(self, path: str, node_id: str | None) -> str:
        """How a node is reached, for people: ``at ADDRESS``, or ``through relay NAME`` (the
        relay by its name, its address left to ``--json``). ``path`` is ``Endpoint.path``."""
        try:
            endpoint = parse_path(path, node_id)
        except ValueError:
            return f"at {clean(path, 80)}"
        if endpoint.relay:
            return f"through relay {self.label(endpoint.relay, endpoint.address)}"
        return f"at {endpoint.address}"

    def known(self) -> list[str]:
        """Every name the table knows: the user's own, and the ones peers gave themselves."""
        if not self.table.path.exists():
            return []
        return [name for e in self.table.load().values() for name in (e.local_name, e.name)
                if name]

    def unknown(self, text: str) -> UnknownPeer:
        """The error for PEER text that names nothing, with the nearest name."""
        return UnknownPeer(f"no peer is named {text!r}{did_you_mean(text, self.known())}: "
                           f"'p2prc peers ls' lists them (a node id, or a unique start of "
                           f"one, works too)")

    def node_id_of(self, text: str) -> str:
        """NODE as a node id: a node id; a name given on this node (to a trusted node, or
        to a peer with 'peers add --name'); a peer's own name; a unique prefix of a trusted
        node's or a peer's id (4+ characters).

        :raises P2PRCError: nothing fits (with the nearest name), or several do.
        """
        text = text.strip()
        lowered = text.lower()
        if is_node_id(lowered):
            return lowered
        trusted = self.trust.names()
        named = [node_id for node_id, name in trusted.items() if name == text]
        if len(named) == 1:
            return named[0]
        entry = self.find(text)
        if entry is not None:
            return entry.node_id
        found = _by_prefix(text, trusted)
        if found is not None:
            return found
        names = list(trusted.values()) + self.known()
        raise UnknownPeer(f"no node is known as {text!r}{did_you_mean(text, names)}: give "
                          f"its node id, or a name from 'p2prc trust' or 'p2prc peers ls'")


@contextlib.contextmanager
def errors_named(label: str) -> Iterator[None]:
    """A ``PeerError`` raised inside names the peer asked (``label``) first, where it named
    only an address (a relay's, say): ``alice: cannot reach [fd00::2]:8088 (relay): ...``."""
    try:
        yield
    except PeerRefused as err:
        if label in str(err):
            raise
        raise PeerRefused(f"{label}: {err}", err.status) from None
    except PeerError as err:
        if label in str(err):
            raise
        raise PeerError(f"{label}: {err}") from None


def _by_prefix(text: str, node_ids: Mapping[str, object]) -> str | None:
    """The one node id that starts with ``text`` (4+ letters and digits), or None.

    :raises P2PRCError: several do.
    """
    lowered = text.lower()
    if len(lowered) < MIN_PREFIX or not lowered.isalnum():
        return None
    found = [node_id for node_id in node_ids if node_id.startswith(lowered)]
    if len(found) > 1:
        raise P2PRCError(f"{text!r} is the start of {len(found)} node ids: give more of it")
    return found[0] if found else None
