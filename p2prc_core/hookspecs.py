"""The hook specifications of p2prc.

Every hook is prefixed ``p2prc_``. Built-in implementations live in
``p2prc_plugins`` and are marked ``trylast`` so that a third-party plugin can
override them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import pluggy

from p2prc_core import PROJECT_NAME

if TYPE_CHECKING:
    import falcon

    from p2prc_core.containers import Backend
    from p2prc_core.models import Address, KnownPeer
    from p2prc_core.tasks import Runner

hookspec = pluggy.HookspecMarker(PROJECT_NAME)


@hookspec(firstresult=True)
def p2prc_select_address(candidates: Sequence[Address], purpose: str) -> Address | None:
    """Choose which of a node's addresses to advertise or to dial.

    The first plugin that returns an address wins. The built-in choice prefers a
    global IPv6 address, then a global IPv4 address, then a unique-local or
    private one, and never picks link-local, loopback or unspecified addresses
    unless the config allows loopback.

    Answer from the arguments alone: for a table of 1,000 peers or more, the order
    this gives a peer's addresses is kept with the table's rows until its entry,
    the plugins or this node's own server change (``peer_listing``).

    :param candidates: the addresses to choose from, in no particular order.
    :param purpose: ``"advertise"`` (what this node tells others) or ``"dial"``
        (which address of a peer to connect to).
    :return: the chosen address, or ``None`` to let the next plugin decide.
    """


@hookspec
def p2prc_score_peer(peer: KnownPeer) -> float | None:
    """Score a peer: higher is better.

    Every plugin may return a number; the host adds them up to rank peers
    (``PluginHooks.score_peer``). The built-in score prefers low latency and
    high bandwidth, and puts unreachable peers last.

    Answer from the peer alone (not the time, nor state of your own): for a table
    of 1,000 peers or more, a peer's score is kept with the table's rows until its
    entry, the plugins or this node's own server change (``peer_listing``).

    :param peer: the peer record with what this node measured of it.
    :return: a score contribution, or ``None`` to abstain.
    """


@hookspec
def p2prc_collect_specs() -> dict[str, Any] | None:
    """Collect this machine's specifications.

    Each plugin returns its part (for example ``{"cpu": {...}}`` or
    ``{"gpus": [...]}``); the host merges the parts into one mapping. A plugin
    must not block on sampling and must not raise because hardware is missing.

    :return: a mapping merged into the node's specs, or ``None``.
    """


@hookspec
def p2prc_register_backends(register: Callable[[str, Backend], None]) -> None:
    """Register virtualization backends (Docker is built in).

    A backend implements ``p2prc_core.containers.Backend``: ``create(spec)`` starts a
    container exactly as the ``ContainerSpec`` says (limits, ports, labels, the SSH key) and
    returns its id; ``host_key``, ``remove``, ``containers``, ``images``, ``gpu_available``
    and ``build_image`` do what they say; the optional ``exec_attach`` runs a command in a
    container for exec streams (without it, ``p2prc exec`` uses SSH). The server picks one by
    the ``backend`` setting.

    :param register: call ``register(name, backend)`` once for each backend.
    """


@hookspec
def p2prc_register_runners(register: Callable[[str, Runner], None]) -> None:
    """Register task runners (Ansible is built in).

    A runner implements ``p2prc_core.tasks.Runner``: ``run(bundle, targets, extravars,
    run_dir, on_event)`` runs the bundle's playbook on every ``RunTarget`` (address, SSH
    port, user, key, pinned host key, handed ports) at once, calls
    ``on_event(host, task, status)`` as it goes, and returns each target's result.
    ``p2prc run --runner NAME`` picks one. A runner may also offer ``start`` (same
    arguments, ``p2prc_core.tasks.EarlyRunner``): started at once, it logs in nowhere until
    ``finish()``, so its start-up overlaps p2prc's last check of the targets.

    :param register: call ``register(name, runner)`` once for each runner.
    """


@hookspec
def p2prc_add_routes(app: falcon.App) -> None:
    """Add REST routes to the peer server (a dashboard, say).

    Routes added here are served next to the built-in ``/v1`` routes and listed
    in ``/v1/openapi.json``.

    :param app: the Falcon application being built.
    """
