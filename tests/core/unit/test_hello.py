"""The typed HELLO: each direction's decode names the bad field, and ignores keys it does not know."""

from __future__ import annotations

from typing import Any

import pytest

from rproxy_core.const import MAX_SERVICES as CONFIG_MAX_SERVICES
from rproxy_core.exceptions import RemoteProtocolError
from rproxy_core.headers import is_tunnel_name
from rproxy_core.policy import parse_agent_policy
from rproxy_core.protocol.hello import MAX_SERVICES, AgentHello, BridgeHello, HelloLimits

_LIMITS: dict[str, Any] = {
    "versions": frozenset({1}),
    "window": (1, 1 << 20, 1000),
    "max_frame": (16, 1 << 16, 4096),
    "max_streams": (1, 100, 10),
}


def test_limits_decode_with_defaults_and_unknown_keys() -> None:
    assert HelloLimits.decode({"version": 1, "later": {"x": 1}}, **_LIMITS) == HelloLimits(1, 1000, 4096, 10)
    assert HelloLimits.decode({"version": 1, "window": 5, "max_streams": 100}, **_LIMITS).window == 5


@pytest.mark.parametrize(
    ("settings", "says"),
    [
        ({}, "unsupported protocol version None"),
        ({"version": True}, "unsupported protocol version True"),
        ({"version": 2}, "unsupported protocol version 2"),
        ({"version": 1, "window": 0}, "'window' out of range: 0"),
        ({"version": 1, "max_frame": "big"}, "'max_frame' out of range: 'big'"),
        ({"version": 1, "max_streams": 101}, "'max_streams' out of range: 101"),
    ],
)
def test_limits_name_the_bad_field(settings: dict[str, Any], says: str) -> None:
    with pytest.raises(RemoteProtocolError, match=says):
        HelloLimits.decode(settings, **_LIMITS)


def test_agent_hello_reads_its_fields_and_tolerates_others() -> None:
    hello = AgentHello.decode(
        {
            "version": 1,
            "services": {"": "http", "ssh": "tcp"},
            "visitor_allow": ["10.0.0.0/8"],
            "software": "rproxy-agent/9",
            "from_the_future": [1, 2],
        }
    )
    assert hello.services == {"": "http", "ssh": "tcp"}
    assert hello.visitor_allow == ("10.0.0.0/8",)
    assert hello.visitor_basic == ()
    assert hello.software == "rproxy-agent/9"
    # An agent from before services offers its main web app.
    assert AgentHello.decode({"version": 1}).services == {"": "http"}


@pytest.mark.parametrize(
    ("settings", "field"),
    [
        ({"services": ["ssh"]}, "services"),
        ({"services": {f"s{n}": "tcp" for n in range(MAX_SERVICES + 2)}}, "services"),
        ({"services": {"Evil Name": "tcp"}}, "services.Evil Name"),
        ({"services": {"ssh": "ftp"}}, "services.ssh"),
        ({"services": {"": "tcp\n"}}, "services."),
        ({"visitor_allow": "10.0.0.0/8"}, "visitor_allow"),
        ({"visitor_basic": {"user": "a"}}, "visitor_basic"),
        ({"visitor_allow": ["10.0.0.1"] * 200, "visitor_basic": [{}] * 57}, "visitor_allow"),
    ],
)
def test_agent_hello_names_the_bad_field(settings: dict[str, Any], field: str) -> None:
    with pytest.raises(RemoteProtocolError, match=f"^HELLO field {field!r}: "):
        AgentHello.decode({"version": 1, **settings})


def test_agent_hello_quotes_peer_text() -> None:
    # The agent's text reaches the bridge's log inside the message: quoted, control characters escaped.
    with pytest.raises(RemoteProtocolError) as caught:
        AgentHello.decode({"services": {"x\n\x1b[2J": "tcp"}})
    assert "\n" not in str(caught.value) and "\x1b" not in str(caught.value)


def test_the_visitor_policy_parser_reads_the_typed_hello() -> None:
    assert parse_agent_policy(AgentHello.decode({"version": 1})) is None
    policy = parse_agent_policy(AgentHello.decode({"visitor_allow": ["192.0.2.0/24"]}))
    assert policy is not None and [str(net) for net in policy.allow] == ["192.0.2.0/24"]
    with pytest.raises(ValueError, match="visitor_allow"):
        parse_agent_policy({"visitor_allow": "not a list"})


def test_bridge_hello_reads_what_the_agent_shows() -> None:
    hello = BridgeHello.decode(
        {"version": 1, "public_url": "https://home.example/", "service_url": "https://{service}.example/", "new": 1}
    )
    assert hello == BridgeHello("https://home.example/", "https://{service}.example/")
    # Only shown to the user: absent, empty or placeholder-less values mean nothing to show.
    assert BridgeHello.decode({"public_url": "", "service_url": "https://x.example/"}) == BridgeHello()
    assert BridgeHello.decode({"service_url": 7}).service_url is None


def test_the_protocols_copies_of_limits_match_the_config() -> None:
    # protocol/ imports nothing above it, so it holds its own copies of these two rules.
    assert MAX_SERVICES == CONFIG_MAX_SERVICES
    for name in ("a", "home", "a-b", "-a", "a-", "A", "a.b", "x" * 63, "x" * 64, "", "ä", "1"):
        decoded = True
        try:
            AgentHello.decode({"services": {name: "tcp"}})
        except RemoteProtocolError:
            decoded = False
        assert decoded == (name == "" or is_tunnel_name(name)), name
