"""p2prc's Ansible callback: each host's result, and the run's recap, as one JSON line each on
the file descriptor in ``P2PRC_EVENTS_FD``. ansible-playbook loads it (p2prc names this folder
in ``ANSIBLE_CALLBACK_PLUGINS`` and the plugin in ``ANSIBLE_CALLBACKS_ENABLED``); p2prc itself
never imports it. Where p2prc asks, it also holds the play until p2prc's word (the gate).
Ansible's own output is left to its stdout callback.

What a task returns comes from the container, so from a stranger: each text is cut to
``_TEXT`` characters here, and p2prc checks each line again when it reads it."""

from __future__ import annotations

import json
import os
from typing import Any

from ansible.plugins.callback import CallbackBase

_TEXT = 8192
_KEYS = ("msg", "reason", "rc", "stderr", "module_stderr", "exception", "changed", "skipped",
         "skip_reason", "failed", "unreachable")
_STATS = ("ok", "changed", "failures", "dark", "skipped", "rescued", "ignored")


def _short(value: Any) -> Any:
    if isinstance(value, bool | int | float) or value is None:
        return value
    return str(value)[:_TEXT]


class CallbackModule(CallbackBase):  # type: ignore[misc]  # Ansible's name for a callback
    CALLBACK_VERSION = 2.0
    CALLBACK_TYPE = "notification"
    CALLBACK_NAME = "p2prc_events"
    CALLBACK_NEEDS_ENABLED = True

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        where = os.environ.get("P2PRC_EVENTS_FD", "")
        self._out = os.fdopen(int(where), "w", encoding="utf-8", errors="replace") \
            if where.isdigit() else None

    def v2_playbook_on_start(self, playbook: Any) -> None:
        """Where p2prc gated the run (``P2PRC_GATE_FD``), wait for its word before the first
        play, so before any login: ``go`` lets the play begin; anything else (p2prc said no,
        or ended) ends Ansible here."""
        gate = os.environ.pop("P2PRC_GATE_FD", "")
        if gate.isdigit():
            with os.fdopen(int(gate), "rb") as source:
                if source.readline(16) != b"go\n":
                    os._exit(75)

    def _emit(self, event: dict[str, Any]) -> None:
        if self._out is not None:
            self._out.write(json.dumps(event, default=str) + "\n")
            self._out.flush()

    def _result(self, event: str, result: Any, ignore_errors: bool = False) -> None:
        res = result._result if isinstance(result._result, dict) else {}
        shown = ""
        exception = getattr(result, "exception", None)  # ansible-core 2.19 and later
        if event == "runner_on_failed" and res.get("exception") and exception is not None:
            try:  # the line Ansible's own output prints for it
                from ansible._internal import _display_utils
                shown = "[ERROR]: " + _display_utils.format_message(exception, False)
            except Exception:  # noqa: BLE001  # an internal of Ansible's that moved
                shown = ""
        self._emit({"event": event, "stdout": shown[:_TEXT], "event_data": {
            "host": result._host.get_name(), "task": _short(result.task_name),
            "ignore_errors": bool(ignore_errors),
            "res": {key: _short(res[key]) for key in _KEYS if key in res}}})

    def v2_runner_on_ok(self, result: Any) -> None:
        self._result("runner_on_ok", result)

    def v2_runner_on_failed(self, result: Any, ignore_errors: bool = False) -> None:
        self._result("runner_on_failed", result, ignore_errors)

    def v2_runner_on_unreachable(self, result: Any) -> None:
        self._result("runner_on_unreachable", result)

    def v2_runner_on_skipped(self, result: Any) -> None:
        self._result("runner_on_skipped", result)

    def v2_playbook_on_stats(self, stats: Any) -> None:
        self._emit({"event": "playbook_on_stats", "event_data": {
            name: {str(host): int(count) for host, count in getattr(stats, name, {}).items()}
            for name in _STATS}})
