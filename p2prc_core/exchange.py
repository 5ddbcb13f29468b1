"""The server's side of a table exchange (``GET``/``POST /v1/peers``): what it answers, and
how many newcomers a caller's network may hand over a minute."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from p2prc_core.discovery import handle_exchange
from p2prc_core.intake import IntakeLimit, source_prefix
from p2prc_core.models import Address
from p2prc_core.peertable import PeerTable
from p2prc_core.wire import ExchangeAnswer


class TableExchange:
    """Answers exchanges over this node's table with its own record."""

    def __init__(self, table: PeerTable, own_record: Callable[[], dict[str, Any]], home: Path,
                 max_records: int, newcomers_per_minute: int):
        self.table = table
        self.own_record = own_record
        self.max_records = max_records
        self.intake = IntakeLimit(home, newcomers_per_minute)

    def answer(self, body: Any, source: str | None = None,
               hosts_caller: bool | None = None) -> ExchangeAnswer:
        """The answer to an exchange (``discovery.handle_exchange``); the new peers a caller
        hands over count against its source's allowance. ``hosts_caller``: whether this host
        would start a container for the caller now (the rule that answers 403 to its
        container request), given only for a caller that signed the exchange; said in the
        answer as ``hosts_you``."""
        prefix = source_prefix(source)
        try:
            observed = str(Address.parse(source)) if source else None
        except ValueError:
            observed = None
        reply = handle_exchange(self.table, self.own_record(), body, self.max_records,
                                admit=lambda wanted: self.intake.admit(prefix, wanted),
                                observed=observed)
        reply.hosts_you = hosts_caller
        return reply

    def etag(self) -> str:
        """Changes whenever the table or this node's record does (for ``If-None-Match``)."""
        return f"{self.table.snapshot().cursor()}:{self.own_record()['seq']}"
