"""The Ansible task runner (ansible-runner): one playbook on many containers at once."""

from __future__ import annotations

import os
import shlex
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from p2prc_core import hookimpl
from p2prc_core.errors import P2PRCError
from p2prc_core.sshkeys import known_hosts_line
from p2prc_core.tasks import GROUP, Bundle, Event, HostResult, Runner, RunResult, RunTarget

_EVENT_STATUS = {"runner_on_ok": "ok", "runner_on_failed": "failed",
                 "runner_on_unreachable": "unreachable", "runner_on_skipped": "skipped"}


def build_inventory(targets: list[RunTarget], run_dir: Path) -> dict[str, Any]:
    """An Ansible inventory of the targets: SSH with our key, host-key checking on against
    one known_hosts file per container (``known_hosts_NAME``: two containers that had the same
    address and port one after the other never share one), and each host's ``p2prc_ports``."""
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
        }
    return {"all": {"children": {GROUP: {"hosts": hosts}}}}


class AnsibleRunner:
    def run(self, bundle: Bundle, targets: list[RunTarget], extravars: dict[str, Any],
            run_dir: Path, on_event: Event, confined: bool = True) -> RunResult:
        try:
            import ansible_runner
        except ImportError:
            raise P2PRCError("ansible-runner is not installed: pip install ansible-runner "
                             "ansible-core") from None
        inventory = build_inventory(targets, run_dir)
        hosts = inventory["all"]["children"][GROUP]["hosts"]
        result = RunResult({t.name: HostResult(t.name, t.container_id) for t in targets})

        def handle(event: dict[str, Any]) -> bool:
            status = _EVENT_STATUS.get(event.get("event", ""))
            data = event.get("event_data", {})
            host = data.get("host")
            if status and host in result.hosts:
                task = data.get("task", "")
                if status in ("failed", "unreachable") and not data.get("ignore_errors"):
                    result.hosts[host].message = _message(data.get("res", {}))
                    result.hosts[host].task = str(task)[:200]
                on_event(host, task, status)
            return True

        # ansible-runner starts ansible-playbook: the one beside this Python comes first.
        bin_dir = str(Path(sys.executable).parent)
        if confined:
            # Extra vars outrank everything a bundle can set (group_vars, set_fact, play
            # vars, the connection keyword), and the limit drops plays for any other host.
            extravars = {**extravars, "ansible_connection": "ssh"}
        runner = ansible_runner.run(
            private_data_dir=str(run_dir), project_dir=str(bundle.path), playbook="site.yml",
            inventory=inventory, extravars=extravars, forks=max(1, len(hosts)), quiet=True,
            event_handler=handle, limit=GROUP if confined else None,
            envvars={"PATH": bin_dir + os.pathsep + os.environ.get("PATH", ""),
                     "ANSIBLE_HOST_KEY_CHECKING": "True", "ANSIBLE_TIMEOUT": "20",
                     "ANSIBLE_RETRY_FILES_ENABLED": "False", "LC_ALL": "C.UTF-8",
                     "ANSIBLE_NOCOLOR": "1"})
        stats = runner.stats or {}
        for name, host in result.hosts.items():
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
                host.message = host.message or f"ansible-runner ended {runner.status}: see " \
                                               f"{run_dir}"
        return result


def _message(res: dict[str, Any]) -> str:
    """Why a task failed, in a line: its message, and what the command wrote to stderr
    (Ansible's "non-zero return code" alone says nothing)."""
    parts = []
    for key in ("msg", "reason", "stderr"):
        text = str(res.get(key) or "").strip()
        if text and text not in parts:
            parts.append(text.splitlines()[-1] if key == "stderr" else text.splitlines()[0])
    if isinstance(res.get("rc"), int) and res.get("rc"):
        parts.insert(1 if parts else 0, f"exit {res['rc']}")
    return ": ".join(parts)[:400]


@hookimpl(trylast=True)
def p2prc_register_runners(register: Callable[[str, Runner], None]) -> None:
    register("ansible", AnsibleRunner())
