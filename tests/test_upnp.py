"""Port mapping through a home router: a real miniupnpd in a NAT lab, seen from home and from
the internet; and the mapper's handling of what a gateway says, with a stubbed gateway."""

from __future__ import annotations

import asyncio
import http.server
import json
import secrets
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any, cast

import pytest
from async_upnp_client import exceptions as upnp_errors
from async_upnp_client.const import HttpRequest
from natlab import NatLab, missing
from netlab import Host, available

from conftest import require
from p2prc_core.upnp import (
    Mapping,
    PortMapper,
    UpnpError,
    _Gateway,
    _gateway_address,
    _GatewayRequester,
)

# Runs PortMapper inside a namespace: argv[1] is a JSON list of [method, kwargs]; prints a
# JSON list of {"ok": result} or {"error": message}, each with the seconds it took.
DRIVER = r"""
import dataclasses, json, sys, time
from p2prc_core.upnp import Mapping, PortMapper, UpnpError
mapper = PortMapper(timeout=float(sys.argv[2]))
out = []
for method, kwargs in json.loads(sys.argv[1]):
    if "mapping" in kwargs:
        kwargs["mapping"] = Mapping(**kwargs["mapping"])
    start = time.monotonic()
    try:
        result = getattr(mapper, method)(**kwargs)
        if isinstance(result, Mapping):
            result = dataclasses.asdict(result)
        out.append({"ok": result})
    except UpnpError as err:
        out.append({"error": str(err)})
    out[-1]["seconds"] = time.monotonic() - start
print(json.dumps(out))
"""

# A TCP server that greets each connection; it says "ready" once it listens.
LISTENER = r"""
import socket, sys
server = socket.create_server(("0.0.0.0", int(sys.argv[1])))
print("ready", flush=True)
while True:
    conn, _ = server.accept()
    conn.sendall(b"hello from home " + sys.argv[1].encode() + b"\n")
    conn.close()
"""

# Connects once with a short timeout and prints the greeting, or FAILED and why.
DIAL = r"""
import socket, sys
try:
    with socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=2) as conn:
        print(conn.recv(100).decode().strip())
except OSError as err:
    print("FAILED", type(err).__name__)
"""


def mapper(host: Host, *calls: tuple[str, dict[str, Any]], timeout: float = 3) -> list[Any]:
    """Call PortMapper methods in one process inside ``host``'s namespace."""
    command = host.command(sys.executable, "-c", DRIVER, json.dumps(calls), str(timeout))
    result = subprocess.run(command, capture_output=True, text=True, timeout=60,
                            cwd=Path(__file__).parent.parent)
    assert result.returncode == 0, result.stderr
    answers: list[Any] = json.loads(result.stdout)
    return answers


def listen(host: Host, port: int) -> None:
    """Start a greeting TCP server in ``host`` (stopped by the lab) and wait until it listens."""
    log = f"listener-{port}.log"
    proc = host.spawn(sys.executable, "-u", "-c", LISTENER, str(port), log=log)
    deadline = time.monotonic() + 10
    while "ready" not in (host.home / log).read_text():
        assert proc.poll() is None, (host.home / log).read_text()
        assert time.monotonic() < deadline, "the listener did not start"
        time.sleep(0.05)


def dial(host: Host, address: str, port: int) -> str:
    """Connect from ``host``: the greeting, or FAILED and why."""
    result = subprocess.run(host.command(sys.executable, "-c", DIAL, address, str(port)),
                            capture_output=True, text=True, timeout=30)
    return result.stdout.strip()


def nat_lab(root: Path, upnp: bool) -> NatLab:
    reason = available() or missing(upnp=upnp)
    require(reason is None, reason or "")
    return NatLab(root, upnp=upnp)


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[NatLab]:
    """A home behind a router that runs miniupnpd, and a friend on the internet side."""
    require(shutil.which("miniupnpd") is not None, "miniupnpd (miniupnpd-iptables) is missing")
    net = nat_lab(tmp_path, upnp=True)
    try:
        net.add_internet_host("friend")
        yield net
    finally:
        net.close()


def friend(lab: NatLab) -> Host:
    return next(h for h in lab.hosts if h.name == "friend")


def free_port() -> int:
    return 20000 + secrets.randbelow(30000)


@pytest.mark.netns
@pytest.mark.integration
def test_home_finds_its_router_and_reads_the_external_address(lab: NatLab) -> None:
    discover, external = mapper(lab.home, ("discover", {}), ("external_ip", {}))
    assert discover["ok"] is True and discover["seconds"] < 3
    assert external == {"ok": lab.router_external_ip, "seconds": external["seconds"]}
    assert lab.router_external_ip == "11.0.0.1"


@pytest.mark.netns
@pytest.mark.integration
def test_a_mapping_lets_the_internet_in_and_unmap_closes_it_again(lab: NatLab) -> None:
    port = free_port()
    listen(lab.home, port)
    outside = friend(lab)
    assert dial(lab.home, "127.0.0.1", port) == f"hello from home {port}"
    assert dial(outside, "11.0.0.1", port).startswith("FAILED")  # NAT: no way in

    (mapped,) = mapper(lab.home, ("map", {"port": port}))
    mapping = mapped["ok"]
    assert mapping == {"external_ip": "11.0.0.1", "external_port": port,
                       "internal_ip": lab.home.ipv4, "internal_port": port,
                       "protocol": "TCP", "lease_seconds": 3600,
                       "gateway": f"UPnP IGD at {lab.router.internal_ip}"}
    (entry,) = lab.mappings()
    assert (entry.external_port, entry.internal_ip, entry.internal_port) == \
        (port, lab.home.ipv4, port)
    assert 0 < entry.lease_seconds <= 3600 and entry.description == "p2prc"
    assert dial(outside, "11.0.0.1", port) == f"hello from home {port}"

    renewed, gone, again = mapper(lab.home, ("renew", {"mapping": mapping}),
                                  ("unmap", {"mapping": mapping}),
                                  ("unmap", {"mapping": mapping}))
    assert renewed["ok"] == mapping  # the same forward, its lease extended
    assert gone == {"ok": None, "seconds": gone["seconds"]}
    assert again["ok"] is None  # already gone: no error
    assert lab.mappings() == [] and lab.router.forwarded_ports() == []
    assert dial(outside, "11.0.0.1", port).startswith("FAILED")


@pytest.mark.netns
@pytest.mark.integration
def test_a_taken_external_port_gives_another_and_both_forwards_work(lab: NatLab) -> None:
    first_port = free_port()
    second_port = first_port + 1
    listen(lab.home, first_port)
    listen(lab.home, second_port)
    first, second = mapper(lab.home, ("map", {"port": first_port}),
                           ("map", {"port": second_port, "external_port": first_port}))
    assert first["ok"]["external_port"] == first_port
    # miniupnpd would silently move home's own forward; the mapper takes another port.
    other = second["ok"]["external_port"]
    assert other != first_port and 1024 <= other <= 65535
    outside = friend(lab)
    assert dial(outside, "11.0.0.1", first_port) == f"hello from home {first_port}"
    assert dial(outside, "11.0.0.1", other) == f"hello from home {second_port}"
    mapper(lab.home, ("unmap", {"mapping": first["ok"]}), ("unmap", {"mapping": second["ok"]}))
    assert lab.mappings() == []


@pytest.mark.netns
@pytest.mark.integration
def test_without_a_upnp_router_discover_is_false_and_map_says_why(tmp_path: Path) -> None:
    net = nat_lab(tmp_path, upnp=False)
    try:
        discover, mapped = mapper(net.home, ("discover", {}), ("map", {"port": 20000}),
                                  timeout=1.5)
    finally:
        net.close()
    assert discover["ok"] is False
    assert 1.4 < discover["seconds"] < 3  # it waits out its timeout, no longer
    assert "no UPnP gateway was found" in mapped["error"]


@pytest.mark.netns
@pytest.mark.integration
def test_natlab_second_home_is_behind_its_own_nat(tmp_path: Path) -> None:
    net = nat_lab(tmp_path, upnp=False)
    try:
        other = net.add_home("other")
        outside = net.add_internet_host("friend")
        assert outside.ipv4 == "11.0.0.10" and net.routers["other"].external_ip == "11.0.0.2"
        listen(outside, 7000)
        listen(other, 7001)
        for home in (net.home, other):  # both homes reach the internet ...
            assert dial(home, "11.0.0.10", 7000) == "hello from home 7000"
        # ... but nothing reaches into a home: not the internet, not the other home.
        assert dial(outside, "11.0.0.2", 7001).startswith("FAILED")
        assert dial(net.home, "11.0.0.2", 7001).startswith("FAILED")
        assert dial(net.home, str(other.ipv4), 7001).startswith("FAILED")
    finally:
        net.close()


# -- a stubbed gateway: the mapper's checks of what a gateway says ----------------------------


class FakeAction:
    def __init__(self, gateway: FakeGateway, name: str):
        self.gateway, self.name = gateway, name

    async def async_call(self, **args: Any) -> dict[str, Any]:
        self.gateway.calls.append((self.name, args))
        answer = self.gateway.answers[self.name]
        if callable(answer):
            answer = answer(args)
        if isinstance(answer, Exception):
            raise answer
        return cast(dict[str, Any], answer)


class FakeGateway:
    """Stands in for async-upnp-client's UpnpService: answers per action name."""

    def __init__(self, **answers: Any):
        self.answers = {"GetExternalIPAddress": {"NewExternalIPAddress": "11.0.0.1"},
                        "GetSpecificPortMappingEntry": refusal(714),
                        "AddPortMapping": {}, "DeletePortMapping": {}, **answers}
        self.calls: list[tuple[str, dict[str, Any]]] = []

    def action(self, name: str) -> FakeAction:
        return FakeAction(self, name)

    def mapper(self) -> PortMapper:
        mapper = PortMapper(timeout=1)
        mapper._gateway = _Gateway("10.0.0.1", "10.0.0.2", cast(Any, self),
                                   frozenset(self.answers))
        return mapper

    def called(self, name: str) -> list[dict[str, Any]]:
        return [args for called, args in self.calls if called == name]


def refusal(code: int) -> upnp_errors.UpnpActionResponseError:
    return upnp_errors.UpnpActionResponseError(status=500, error_code=code,
                                               error_desc="<b>[red]Refused</red>")


@pytest.mark.parametrize("reported", ["not-an-ip", "11.0.0.1; rm -rf /", "::1", "0.0.0.0",
                                      "224.0.0.1", "127.0.0.1", "", None, 42])
def test_an_odd_external_address_is_refused_before_anything_is_mapped(reported: Any) -> None:
    gateway = FakeGateway(GetExternalIPAddress={"NewExternalIPAddress": reported})
    with pytest.raises(UpnpError) as err:
        gateway.mapper().map(20000)
    assert "10.0.0.1" in str(err.value) and "\n" not in str(err.value)
    assert gateway.called("AddPortMapping") == []
    with pytest.raises(UpnpError):
        gateway.mapper().external_ip()


def test_a_gateway_with_only_permanent_leases_gets_lease_zero() -> None:
    gateway = FakeGateway(AddPortMapping=lambda args: refusal(725)
                          if args["NewLeaseDuration"] else {})
    mapping = gateway.mapper().map(20000, lease_seconds=600)
    assert mapping.lease_seconds == 0
    assert [a["NewLeaseDuration"] for a in gateway.called("AddPortMapping")] == [600, 0]
    assert mapping.internal_ip == "10.0.0.2" and gateway.called("AddPortMapping")[0][
        "NewInternalClient"] == "10.0.0.2"


def test_a_conflict_tries_other_ports_and_gives_up_with_one_line() -> None:
    gateway = FakeGateway(AddPortMapping=lambda args: refusal(718)
                          if args["NewExternalPort"] == 20000 else {})
    mapping = gateway.mapper().map(20000)
    assert mapping.external_port != 20000 and mapping.internal_port == 20000
    always = FakeGateway(AddPortMapping=refusal(718))
    with pytest.raises(UpnpError, match="has port 20000 and 3 others forwarded elsewhere"):
        always.mapper().map(20000)
    assert len(always.called("AddPortMapping")) == 4


def test_a_gateways_own_words_are_reduced_to_plain_text() -> None:
    gateway = FakeGateway(AddPortMapping=refusal(606))
    with pytest.raises(UpnpError) as err:
        gateway.mapper().map(20000)
    assert str(err.value) == "the UPnP gateway at 10.0.0.1 refused AddPortMapping: error 606 " \
        "(bredRefusedred)"


def test_unmap_leaves_alone_what_is_gone_or_no_longer_ours() -> None:
    mapping = Mapping("11.0.0.1", 20000, "10.0.0.2", 20000, "TCP", 3600, "UPnP IGD at x")
    gone = FakeGateway()
    gone.mapper().unmap(mapping)
    assert gone.called("DeletePortMapping") == []
    theirs = FakeGateway(GetSpecificPortMappingEntry={"NewInternalClient": "10.0.0.7",
                                                      "NewInternalPort": 20000})
    theirs.mapper().unmap(mapping)
    assert theirs.called("DeletePortMapping") == []
    raced = FakeGateway(GetSpecificPortMappingEntry={"NewInternalClient": "10.0.0.2",
                                                     "NewInternalPort": 20000},
                        DeletePortMapping=refusal(714))
    raced.mapper().unmap(mapping)  # deleted by someone else meanwhile: still no error
    assert len(raced.called("DeletePortMapping")) == 1
    with pytest.raises(UpnpError, match="refused DeletePortMapping: error 501"):
        FakeGateway(GetSpecificPortMappingEntry={"NewInternalClient": "10.0.0.2",
                                                 "NewInternalPort": 20000},
                    DeletePortMapping=refusal(501)).mapper().unmap(mapping)


def test_bad_arguments_are_refused_before_asking_the_gateway() -> None:
    mapper = FakeGateway().mapper()
    bad_arguments: list[dict[str, Any]] = [
        {"port": 0}, {"port": 70000}, {"port": 80, "external_port": 0},
        {"port": 80, "lease_seconds": -1}, {"port": 80, "lease_seconds": 10**7}]
    for bad in bad_arguments:
        with pytest.raises(ValueError):
            mapper.map(**bad)


@pytest.mark.parametrize(("location", "host"), [
    ("http://8.8.8.8:5000/rootDesc.xml", "10.0.0.1"),  # points away from who answered
    ("https://10.0.0.1:5000/rootDesc.xml", "10.0.0.1"),
    ("http://example.com/rootDesc.xml", "10.0.0.1"),
    ("http://10.0.0.1:99999/rootDesc.xml", "10.0.0.1"),
    ("http://[fe80::1]/rootDesc.xml", "fe80::1"),
    ("file:///etc/passwd", "10.0.0.1"),
    ("", "10.0.0.1"),
])
def test_an_ssdp_answer_pointing_elsewhere_is_refused(location: str, host: str) -> None:
    with pytest.raises(UpnpError):
        _gateway_address(location, host)
    assert _gateway_address("http://10.0.0.1:5000/rootDesc.xml", "10.0.0.1") == "10.0.0.1"


def test_the_gateway_requester_fetches_from_the_gateway_only_and_bounds_answers() -> None:
    big = b"x" * (300 * 1024)

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path == "/moved":
                self.send_response(302)
                self.send_header("Location", "http://127.0.0.2:1/elsewhere")
                self.end_headers()
                return
            body = big if self.path == "/big" else b"<root/>"
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    requester = _GatewayRequester("127.0.0.1", timeout=2)

    def get(url: str) -> Any:
        return asyncio.run(requester.async_http_request(HttpRequest("GET", url, {}, None)))

    try:
        assert get(base + "/rootDesc.xml").body == "<root/>"
        assert get(base + "/moved").status_code == 302  # not followed
        with pytest.raises(UpnpError, match="over 256 KiB"):
            get(base + "/big")
        with pytest.raises(UpnpError, match="pointed to another host"):
            get(f"http://127.0.0.2:{server.server_address[1]}/rootDesc.xml")
    finally:
        server.shutdown()
        server.server_close()


def test_mapping_round_trips_as_plain_data() -> None:
    mapping = Mapping("11.0.0.1", 20000, "10.0.0.2", 20000, "TCP", 3600, "UPnP IGD at x")
    assert Mapping(**asdict(mapping)) == mapping


def test_udp_is_mapped_when_asked_and_its_holder_asked_for_udp() -> None:
    gateway = FakeGateway()
    mapping = gateway.mapper().map(20000, protocol="UDP")
    assert mapping.protocol == "UDP"
    assert [a["NewProtocol"] for a in gateway.called("AddPortMapping")] == ["UDP"]
    assert [a["NewProtocol"] for a in gateway.called("GetSpecificPortMappingEntry")] == ["UDP"]
    gateway.mapper().unmap(mapping)
    assert gateway.called("DeletePortMapping") == [] or \
        gateway.called("DeletePortMapping")[0]["NewProtocol"] == "UDP"
    with pytest.raises(ValueError, match="protocol"):
        gateway.mapper().map(20000, protocol="SCTP")
