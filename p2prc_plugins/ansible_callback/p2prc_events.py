"""p2prc's Ansible stdout callback: Ansible's default output, and each host's result and the
run's recap as one JSON line each on the file descriptor in ``P2PRC_EVENTS_FD``.
ansible-playbook loads it (p2prc names this folder in ``ANSIBLE_CALLBACK_PLUGINS`` and the
plugin in ``ANSIBLE_STDOUT_CALLBACK``); p2prc itself never imports it.

Where p2prc asks (``P2PRC_GATE_FD``), it holds the play before its first task, so before any
login, until p2prc's word. It fails closed: as the stdout callback, a plugin that does not
load ends Ansible before any play; any fault at the gate, or p2prc gone (its pipe broken),
ends Ansible there and then.

What a task returns comes from the container, so from a stranger: each text is cut to
``_TEXT`` characters here, and p2prc checks each line again when it reads it."""

from __future__ import annotations

import json
import os
from typing import Any

from ansible.plugins.callback.default import CallbackModule as Default

DOCUMENTATION = """
    name: p2prc_events
    type: stdout
    short_description: Ansible's default output, and each host's result for p2prc
    description:
      - Ansible's default output; each host's result and the recap as JSON lines on the
        file descriptor in P2PRC_EVENTS_FD; with P2PRC_GATE_FD, the play held until p2prc
        writes "go".
    extends_documentation_fragment:
      - default_callback
      - result_format_callback
"""

_TEXT = 8192
_KEYS = ("msg", "reason", "rc", "stderr", "module_stderr", "exception", "changed", "skipped",
         "skip_reason", "failed", "unreachable")
_STATS = ("ok", "changed", "failures", "dark", "skipped", "rescued", "ignored")
_NO = 75  # the exit code when p2prc said no, or is gone


def _short(value: Any) -> Any:
    if isinstance(value, bool | int | float) or value is None:
        return value
    return str(value)[:_TEXT]


class CallbackModule(Default):  # type: ignore[misc]  # Ansible's name for a callback
    CALLBACK_VERSION = 2.0
    CALLBACK_TYPE = "stdout"
    CALLBACK_NAME = "p2prc_events"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        where = os.environ.get("P2PRC_EVENTS_FD", "")
        # (a descriptor that is not there raises here: Ansible then cannot load its stdout
        # callback, and ends before any play)
        self._out = os.fdopen(int(where), "w", encoding="utf-8", errors="replace") \
            if where.isdigit() else None

    def v2_playbook_on_start(self, playbook: Any) -> None:
        """Where p2prc gated the run, wait for its word before the first play: ``go`` lets it
        begin; anything else, or any fault here, ends Ansible (an exception would only be
        warned about, and the play would go on)."""
        gate = os.environ.pop("P2PRC_GATE_FD", "")
        if gate:
            try:
                with os.fdopen(int(gate), "rb") as source:
                    word = source.readline(16)
            except BaseException:  # noqa: BLE001 - fail closed, whatever it was
                os._exit(_NO)
            if word != b"go\n":
                os._exit(_NO)
        super().v2_playbook_on_start(playbook)

    def _emit(self, event: dict[str, Any]) -> None:
        if self._out is None:
            return
        try:
            self._out.write(json.dumps(event, default=str) + "\n")
            self._out.flush()
        except OSError:  # p2prc is gone: nobody would see the rest, nor stop it
            os._exit(_NO)

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
        self._result("runner_on_ok", result)  # (before Ansible's output, which trims it)
        super().v2_runner_on_ok(result)

    def v2_runner_on_failed(self, result: Any, ignore_errors: bool = False) -> None:
        self._result("runner_on_failed", result, ignore_errors)
        super().v2_runner_on_failed(result, ignore_errors)

    def v2_runner_on_unreachable(self, result: Any) -> None:
        self._result("runner_on_unreachable", result)
        super().v2_runner_on_unreachable(result)

    def v2_runner_on_skipped(self, result: Any) -> None:
        self._result("runner_on_skipped", result)
        super().v2_runner_on_skipped(result)

    def v2_playbook_on_stats(self, stats: Any) -> None:
        self._emit({"event": "playbook_on_stats", "event_data": {
            name: {str(host): int(count) for host, count in getattr(stats, name, {}).items()}
            for name in _STATS}})
        super().v2_playbook_on_stats(stats)
