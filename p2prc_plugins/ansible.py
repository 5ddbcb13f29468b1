"""The Ansible task runner: one playbook on many containers at once (ansible-playbook, with
p2prc's callback for live results: ``ansible_process``)."""

from __future__ import annotations

import os
import re
import shlex
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from p2prc_core import hookimpl

if TYPE_CHECKING:  # loaded where used: every command loads this plugin, few run playbooks
    from p2prc_core.tasks import Bundle, Event, Runner, RunResult, RunTarget

_EVENT_STATUS = {"runner_on_ok": "ok", "runner_on_failed": "failed",
                 "runner_on_unreachable": "unreachable", "runner_on_skipped": "skipped"}


def build_inventory(targets: list[RunTarget], run_dir: Path) -> dict[str, Any]:
    """An Ansible inventory of the targets: SSH with our key, host-key checking on against
    one known_hosts file per container (``known_hosts_NAME``: two containers that had the same
    address and port one after the other never share one), and each host's ``p2prc_ports``.
    Through the tunnel, each container's one connection is the one ``p2prc ssh`` shares
    (``ssh_args``)."""
    from p2prc_core.sshkeys import known_hosts_line
    from p2prc_core.tasks import GROUP

    hosts: dict[str, Any] = {}
    run_dir.mkdir(parents=True, exist_ok=True)
    for target in targets:
        known_hosts = run_dir / f"known_hosts_{target.name}"
        common = f"-o UserKnownHostsFile={known_hosts} -o StrictHostKeyChecking=yes " \
                 f"-o IdentitiesOnly=yes"
        address, port = target.address, target.port
        if target.proxy_command:  # through the host's p2prc port; the key under an alias
            address, port = f"p2prc-{target.name}", 22
            known_hosts.write_text(f"{address} {target.host_key}\n")
            common += f" -o HostKeyAlias={address} -o " + \
                shlex.quote(f"ProxyCommand={target.proxy_command}")
        else:
            known_hosts.write_text(known_hosts_line(address, port, target.host_key))
        hosts[target.name] = {
            "ansible_host": address, "ansible_port": port,
            "ansible_user": target.user,
            "ansible_ssh_private_key_file": str(target.private_key),
            "ansible_ssh_common_args": common,
            "ansible_python_interpreter": "/usr/bin/python3",
            "p2prc_container": target.container_id, "p2prc_ports": target.ports,
            **ssh_args(target),
        }
    return {"all": {"children": {GROUP: {"hosts": hosts}}}}


def ssh_args(target: RunTarget) -> dict[str, str]:
    """Ansible's own ``ssh_args`` (compression, one connection per host kept 60 s) with,
    through the tunnel, the connection in the node's home that ``p2prc ssh`` and
    ``ssh-config`` share: a run after them (or a second run) starts no tunnel helper."""
    from p2prc_core.tunnel import REUSE_SECONDS, container_control_path, helper_home

    home = helper_home(target.proxy_command) if target.proxy_command else None
    if home is None:
        return {}  # Ansible's defaults: one connection per host for the run
    control = container_control_path(home, target.container_id, target.host_key)
    return {"ansible_ssh_args": f"-C -o ControlMaster=auto -o ControlPersist={REUSE_SECONDS}s "
                                f"-o " + shlex.quote(f"ControlPath={control}")}


class AnsibleRunner:
    def run(self, bundle: Bundle, targets: list[RunTarget], extravars: dict[str, Any],
            run_dir: Path, on_event: Event, confined: bool = True) -> RunResult:
        return self.start(bundle, targets, extravars, run_dir, on_event, confined,
                          gated=False).finish()

    def start(self, bundle: Bundle, targets: list[RunTarget], extravars: dict[str, Any],
              run_dir: Path, on_event: Event, confined: bool = True,
              gated: bool = True) -> AnsibleRun:
        """ansible-playbook started, held before its first play (so before any login) until
        ``finish``: its start-up (about half a second of imports) overlaps the caller's last
        checks."""
        return AnsibleRun(bundle, targets, extravars, run_dir, on_event, confined, gated)


class AnsibleRun:
    """One run of a bundle by ansible-playbook: its results per host, as they come."""

    def __init__(self, bundle: Bundle, targets: list[RunTarget], extravars: dict[str, Any],
                 run_dir: Path, on_event: Event, confined: bool, gated: bool) -> None:
        from p2prc_core.tasks import GROUP, HostResult, RunResult
        from p2prc_plugins.ansible_process import Playbook

        inventory = build_inventory(targets, run_dir)
        hosts = inventory["all"]["children"][GROUP]["hosts"]
        self.result = RunResult({t.name: HostResult(t.name, t.container_id) for t in targets})
        self.on_event = on_event
        if confined:
            # Extra vars outrank everything a bundle can set (group_vars, set_fact, play
            # vars, the connection keyword), and the limit drops plays for any other host.
            extravars = {**extravars, "ansible_connection": "ssh"}
        # ansible-playbook runs ssh: the ProxyCommand helper beside this Python comes first.
        bin_dir = str(Path(sys.executable).parent)
        self.playbook = Playbook(
            bundle.path, bundle.playbook, inventory, extravars, run_dir, self._handle,
            forks=len(hosts), limit=GROUP if confined else None, gated=gated,
            env={"PATH": bin_dir + os.pathsep + os.environ.get("PATH", ""),
                 "ANSIBLE_HOST_KEY_CHECKING": "True", "ANSIBLE_TIMEOUT": "20",
                 "ANSIBLE_RETRY_FILES_ENABLED": "False", "LC_ALL": "C.UTF-8",
                 "ANSIBLE_NOCOLOR": "1"})

    def cancel(self) -> None:
        """End it before its first play: nothing was logged in to."""
        self.playbook.cancel()

    def finish(self) -> RunResult:
        """Let the play begin, and wait for its end: each host's counts and state."""
        end = self.playbook.wait()
        stats = end.stats
        for name, host in self.result.hosts.items():
            host.ok = stats.get("ok", {}).get(name, 0)
            host.changed = stats.get("changed", {}).get(name, 0)
            host.failed = stats.get("failures", {}).get(name, 0)
            if stats.get("dark", {}).get(name):
                host.status = "unreachable"
            elif host.failed:
                host.status = "failed"
            elif name in stats.get("ok", {}) or name in stats.get("skipped", {}):
                host.status = "ok"
            else:
                host.status = "failed"
                host.message = host.message or (
                    f"ansible-playbook ended with exit {end.rc}"
                    + (f": {end.last_line}" if end.last_line else "") + f" (see {end.output})")
        return self.result

    def _handle(self, event: dict[str, Any]) -> None:
        status = _EVENT_STATUS.get(event.get("event", ""))
        data = event.get("event_data", {})
        host = data.get("host")
        if status and isinstance(host, str) and host in self.result.hosts:
            task = data.get("task", "")
            res = data.get("res")
            if status in ("failed", "unreachable") and not data.get("ignore_errors"):
                self.result.hosts[host].message = _message(res if isinstance(res, dict) else {},
                                                           str(event.get("stdout") or ""))
                self.result.hosts[host].task = str(task)[:200]
            self.on_event(host, str(task), status)


def _message(res: dict[str, Any], shown: str = "") -> str:
    """Why a task failed, in one short line, from what Ansible itself said: its message (or,
    where that is only a summary, such as ansible-core 2.19's "Error executing command.", the
    cause Ansible printed with it: ``shown`` is the event's output), the exit code, then the
    last line the module or command wrote to stderr, or the exception it raised."""
    first = _first_line(res.get("msg")) or _first_line(res.get("reason"))
    cause = _printed_cause(shown)
    if cause and (not first or cause.startswith(first.rstrip(".")) and cause != first):
        first = cause  # "Error executing command: [Errno 2] No such file or directory: ..."
    parts = [first] if first else []
    rc = res.get("rc")
    if isinstance(rc, int) and not isinstance(rc, bool) and rc and f"[Errno {rc}]" not in first:
        parts.append(f"exit {rc}")  # an errno in the text already says why it did not start
    for detail in (_last_line(res.get("module_stderr")), _last_line(res.get("stderr")),
                   _exception_line(res.get("exception"))):
        if detail and not any(detail in part or part in detail for part in parts):
            parts.append(detail)
            break
    return ": ".join(parts)[:400]


def _first_line(value: Any) -> str:
    lines = [line.strip() for line in str(value or "").splitlines() if line.strip()]
    return lines[0] if lines else ""


def _last_line(value: Any) -> str:
    lines = [line.strip() for line in str(value or "").splitlines() if line.strip()]
    return lines[-1] if lines else ""


_PRINTED = re.compile(r"^\[ERROR\]: Task failed: (?:(?:Module|Action) failed: )?(.+)$", re.M)
_EXCEPTION = re.compile(r"^(?:[A-Za-z_][\w.]*)(?:Error|Exception|Exit)\b: .+$", re.M)


def _printed_cause(shown: str) -> str:
    """The cause in the line ansible-core (2.19 and later) prints for a failed task."""
    found = _PRINTED.search(re.sub(r"\x1b\[[0-9;]*m", "", shown))
    return found.group(1).strip() if found else ""


def _exception_line(value: Any) -> str:
    """The first exception a module's traceback names (the cause, when one was chained)."""
    found = _EXCEPTION.search(str(value or ""))
    return found.group(0).strip() if found else ""


@hookimpl(trylast=True)
def p2prc_register_runners(register: Callable[[str, Runner], None]) -> None:
    register("ansible", AnsibleRunner())
