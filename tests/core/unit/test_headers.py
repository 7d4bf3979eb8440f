"""Header handling: hop-by-hop fields, and who the visitor is behind forwarding proxies."""

from __future__ import annotations

from ipaddress import ip_network

import pytest
from aiohttp.test_utils import make_mocked_request
from multidict import CIMultiDict

from rproxy_core.agent.upstream import visitor_address
from rproxy_core.bridge.forwarded import behind_proxies
from rproxy_core.headers import strip_hop_by_hop

E2E = [("Host", "home.test"), ("Accept", "*/*"), ("Cookie", "a=1")]

HOP_BY_HOP = [
    pytest.param([], [], id="empty"),
    pytest.param(E2E, E2E, id="end-to-end-kept-in-order"),
    pytest.param(
        [("Connection", "keep-alive"), *E2E, ("Keep-Alive", "timeout=5"), ("TE", "trailers")], E2E, id="listed"
    ),
    pytest.param(
        [("Transfer-Encoding", "chunked"), ("Upgrade", "h2c"), ("Trailer", "X"), ("Expect", "100-continue"), *E2E],
        E2E,
        id="framing-and-expect",
    ),
    pytest.param(
        [("connection", "X-Secret, close"), ("X-Secret", "1"), ("x-secret", "2"), *E2E], E2E, id="named-in-connection"
    ),
    pytest.param(
        [("Connection", " x-a ,, X-B "), ("X-A", "1"), ("X-B", "2"), ("X-C", "3")],
        [("X-C", "3")],
        id="connection-tokens-trimmed",
    ),
    pytest.param(
        [("Connection", "a"), ("Connection", "b"), ("A", "1"), ("B", "2"), ("C", "3")],
        [("C", "3")],
        id="two-connection-fields",
    ),
    pytest.param([("Proxy-Connection", "keep-alive"), ("PROXY-CONNECTION", "x"), *E2E], E2E, id="proxy-connection"),
]


@pytest.mark.parametrize(("headers", "kept"), HOP_BY_HOP)
def test_hop_by_hop_fields_are_dropped(headers: list[tuple[str, str]], kept: list[tuple[str, str]]) -> None:
    """RFC 9110 §7.6.1: the fixed set and every field the Connection field names, in any case."""
    assert strip_hop_by_hop(headers) == kept


def test_extra_fields_can_be_dropped_too() -> None:
    """``extra`` (lower-case names) is dropped on top; the input iterable may be a generator."""
    headers = (pair for pair in [("Sec-WebSocket-Key", "k"), *E2E])
    assert strip_hop_by_hop(headers, frozenset({"sec-websocket-key"})) == E2E


PROXY = ["10.0.0.0/8", "2001:db8:ffff::/48"]

# (peer, X-Forwarded-For fields, X-Forwarded-Proto fields, the visitor and scheme the bridge believes)
FORWARDED = [
    pytest.param("203.0.113.9", ["198.51.100.1"], ["https"], ("203.0.113.9", "http"), id="untrusted-peer-ignored"),
    pytest.param("10.0.0.2", ["198.51.100.1"], ["https"], ("198.51.100.1", "https"), id="one-proxy"),
    pytest.param("10.0.0.2", ["6.6.6.6, 198.51.100.1, 10.0.0.3"], [], ("198.51.100.1", "http"), id="chain"),
    pytest.param("10.0.0.2", ["6.6.6.6", "198.51.100.1"], [], ("198.51.100.1", "http"), id="two-fields"),
    pytest.param("10.0.0.2", ["10.1.1.1, 10.0.0.3"], [], ("10.1.1.1", "http"), id="all-trusted-leftmost"),
    pytest.param("10.0.0.2", [], ["https"], ("10.0.0.2", "https"), id="no-xff-the-proxy"),
    pytest.param("10.0.0.2", ["198.51.100.1, unknown"], [], ("10.0.0.2", "http"), id="garbage-stops-at-last-trusted"),
    pytest.param("10.0.0.2", ["198.51.100.1:4711"], [], ("198.51.100.1", "http"), id="ipv4-with-port"),
    pytest.param("10.0.0.2", ["[2001:db8::7]:443"], [], ("2001:db8::7", "http"), id="ipv6-bracketed-port"),
    pytest.param("10.0.0.2", ["2001:db8::7"], [], ("2001:db8::7", "http"), id="ipv6-bare"),
    pytest.param("10.0.0.2", ["::ffff:198.51.100.1"], [], ("198.51.100.1", "http"), id="ipv4-mapped"),
    pytest.param("::ffff:10.0.0.2", ["198.51.100.1"], [], ("198.51.100.1", "http"), id="mapped-peer-trusted"),
    pytest.param("2001:db8:ffff::1", ["198.51.100.1"], [], ("198.51.100.1", "http"), id="ipv6-proxy"),
    pytest.param("10.0.0.2", [], ["gopher"], ("10.0.0.2", "http"), id="unknown-proto-ignored"),
    pytest.param("10.0.0.2", [], ["http, HTTPS"], ("10.0.0.2", "https"), id="last-proto-wins"),
    pytest.param("", ["198.51.100.1"], [], ("", "http"), id="no-peer"),
]


@pytest.mark.parametrize(("peer", "xff", "proto", "believed"), FORWARDED)
def test_the_visitor_behind_trusted_proxies(
    peer: str, xff: list[str], proto: list[str], believed: tuple[str, str]
) -> None:
    """X-Forwarded-For walked from the right past trusted proxies; X-Forwarded-Proto only http/https."""
    headers: CIMultiDict[str] = CIMultiDict()
    for value in xff:
        headers.add("X-Forwarded-For", value)
    for value in proto:
        headers.add("X-Forwarded-Proto", value)
    request = make_mocked_request("GET", "/", headers=headers)
    assert behind_proxies(request, peer, "http", [ip_network(n) for n in PROXY]) == believed


@pytest.mark.parametrize(
    ("headers", "address"),
    [
        ([("X-Forwarded-For", "198.51.100.1")], "198.51.100.1"),
        ([("x-forwarded-for", "6.6.6.6, 198.51.100.1 ")], "198.51.100.1"),
        ([("Host", "h"), ("X-Forwarded-For", "2001:db8::1"), ("X-Forwarded-For", "6.6.6.6")], "2001:db8::1"),
        ([("Host", "h")], ""),
    ],
)
def test_the_agent_reads_the_address_the_bridge_reported(headers: list[tuple[str, str]], address: str) -> None:
    """The agent takes the last entry of the first X-Forwarded-For field (the bridge sends exactly one)."""
    assert visitor_address(headers) == address
