import pytest

from p2prc_core.models import Address, Endpoint, parse_endpoint, parse_size


@pytest.mark.parametrize("text, host, port", [
    ("192.0.2.7", "192.0.2.7", 8088),
    ("192.0.2.7:9000", "192.0.2.7", 9000),
    ("[fd00::7]:9000", "fd00::7", 9000),
    ("[fd00::7]", "fd00::7", 8088),
    ("fd00::7", "fd00::7", 8088),
    ("peer.example", "peer.example", 8088),
    ("http://peer.example:81/", "peer.example", 81),
])
def test_parse_endpoint(text: str, host: str, port: int) -> None:
    assert parse_endpoint(text) == Endpoint(host, port)


@pytest.mark.parametrize("text, words", [
    ("", "empty"),
    ("[fd00::7", "missing ']'"),
    ("[nothex::zz]:1", "not an IPv6"),
    ("192.0.2.7:0", "port must be"),
    ("192.0.2.7:70000", "port must be"),
    ("192.0.2.7:http", "port must be"),
    ("bad_host!:80", "not an IP address or host name"),
])
def test_parse_endpoint_rejects(text: str, words: str) -> None:
    with pytest.raises(ValueError, match=words):
        parse_endpoint(text)


def test_endpoint_urls_bracket_ipv6() -> None:
    assert Endpoint("fd00::1", 80).url() == "https://[fd00::1]:80"
    assert str(Endpoint("fd00::1", 80)) == "[fd00::1]:80"
    assert Endpoint("192.0.2.1", 80).url("http") == "http://192.0.2.1:80"


def test_node_id_at_address_names_the_node_expected_there() -> None:
    node = "a" * 26
    endpoint = parse_endpoint(f"{node.upper()}@[fd00::1]:8100")
    assert (endpoint.host, endpoint.port, endpoint.node_id) == ("fd00::1", 8100, node)
    assert str(endpoint) == "[fd00::1]:8100" and endpoint == Endpoint("fd00::1", 8100)
    with pytest.raises(ValueError, match="is not a node id"):
        parse_endpoint("alice@10.0.0.1")


@pytest.mark.parametrize("text, kind", [
    ("2001:4860::8888", "global"), ("8.8.8.8", "global"), ("fd00::1", "unique-local"),
    ("10.1.2.3", "private"), ("::1", "loopback"), ("127.0.0.1", "loopback"),
    ("fe80::1", "link-local"), ("169.254.169.254", "link-local"), ("::", "unspecified"),
    ("ff02::1", "multicast"), ("::ffff:127.0.0.1", "loopback"),
])
def test_address_kinds(text: str, kind: str) -> None:
    assert Address.parse(text).kind == kind


def test_sizes() -> None:
    assert parse_size("512") == 512
    assert parse_size("64k") == 64 * 1024
    assert parse_size("10M") == 10 * 1024 * 1024
    assert parse_size("1.5G") == 3 * 1024 ** 3 // 2
    for bad in ("", "ten", "5 parsecs", "-1"):
        with pytest.raises(ValueError, match="not a size"):
            parse_size(bad)


@pytest.mark.parametrize("text", [
    "1.2.3.4\n:8088", "nas.lan\n:9000", "peer.example\n:1", "a" * 26 + "@1.2.3.4\n:8088",
    "[fe80::1%eth0\n]:8088", "fe80::1%a\x1b]0;x\x07", "[fe80::1%a b]:80", "[fd00::1%]:80",
])
def test_a_line_break_or_control_in_an_address_is_refused(text: str) -> None:
    with pytest.raises(ValueError):
        parse_endpoint(text)


def test_a_zone_is_an_interface_name() -> None:
    assert parse_endpoint("[fe80::1%eth0]:80").host == "fe80::1%eth0"


def test_two_node_ids_are_refused_not_one_kept() -> None:
    first, second = "a" * 26, "b" * 26
    with pytest.raises(ValueError, match="more than one node id"):
        parse_endpoint(f"{first}@{second}@10.0.0.1:8088")


def test_the_quick_way_to_an_addresss_kind_gives_the_same_word_as_the_rules() -> None:
    """``address_kind`` answers "global" from a search of special ranges: it must agree with
    ``ipaddress``'s own tests at both edges of every network those tests know, and on 40,000
    random addresses (half of them where global IPv6 addresses live)."""
    import ipaddress
    import random

    from p2prc_core.models import _SPECIAL, address_kind, kind_by_rules

    assert _SPECIAL, "this Python's lists were not found: every address takes the long way"
    probes: list[ipaddress.IPv4Address | ipaddress.IPv6Address] = []
    for version, (starts, ends) in _SPECIAL.items():
        top = 2 ** (32 if version == 4 else 128) - 1
        make = ipaddress.IPv4Address if version == 4 else ipaddress.IPv6Address
        for start, end in zip(starts, ends, strict=True):
            for value in (start - 1, start, start + 1, end - 1, end, end + 1):
                if 0 <= value <= top:
                    probes.append(make(value))
    rng = random.Random(7)
    probes += [ipaddress.IPv4Address(rng.getrandbits(32)) for _ in range(10_000)]
    probes += [ipaddress.IPv6Address(rng.getrandbits(128)) for _ in range(10_000)]
    probes += [ipaddress.IPv6Address((0x2 << 125) | rng.getrandbits(125)) for _ in range(20_000)]
    wrong = [(str(ip), address_kind(ip), kind_by_rules(ip)) for ip in probes
             if address_kind(ip) != kind_by_rules(ip)]
    assert wrong == []
    assert sum(address_kind(ip) == "global" for ip in probes) > 10_000  # the quick way ran
