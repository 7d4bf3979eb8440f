"""The gateway's bookkeeping without sockets: ids, limits, queues, frames from callbacks, signatures, settings."""

from __future__ import annotations

import argparse
import base64
import hashlib
import hmac
from ipaddress import ip_address

import pytest

from rproxy_core.cli.gateway import gateway_settings
from rproxy_core.exceptions import ConfigError
from rproxy_core.gateway.core import (
    BINARY,
    TEXT,
    ConnectionTable,
    GatewayConfig,
    callback_frame,
    is_private_address,
    shown,
    sign,
)
from rproxy_core.gateway.server import _close_args, _close_reason


def table(**overrides: object) -> ConnectionTable:
    config = GatewayConfig(base_url="https://ws.example.com/")
    for key, value in overrides.items():
        setattr(config, key, value)
    return ConnectionTable(config)


def test_ids_are_128_random_bits_and_the_callback_is_under_the_base_url() -> None:
    connections = table()
    made = [connections.add("192.0.2.1", "https://b/f", None, (), 0.0) for _ in range(200)]
    ids = {conn.id for conn in made}
    assert len(ids) == 200
    for conn in made:
        assert len(base64.urlsafe_b64decode(conn.id + "==")) == 16
        assert conn.callback == f"https://ws.example.com/{conn.id}"
        assert connections.get(conn.id) is conn


def test_limits_in_all_and_per_address() -> None:
    connections = table(max_connections=3, max_connections_per_address=2)
    first = connections.add("192.0.2.1", "f", None, (), 0)
    connections.add("192.0.2.1", "f", None, (), 0)
    assert connections.refusal("192.0.2.1") == (429, "too many connections from your address")
    assert connections.refusal("192.0.2.2") is None
    connections.add("192.0.2.2", "f", None, (), 0)
    assert connections.refusal("192.0.2.3") is not None and connections.refusal("192.0.2.3")[0] == 503  # type: ignore[index]
    connections.remove(first)
    connections.remove(first)  # twice is once
    assert len(connections) == 2 and connections.refusal("192.0.2.1") is None
    assert connections.get(first.id) is None


def test_idle_and_lifetime_expiry() -> None:
    connections = table(idle_timeout=10, max_lifetime=100)
    idle = connections.add("a", "f", None, (), 0)
    busy = connections.add("a", "f", None, (), 0)
    waiting = connections.add("a", "f", None, (), 0)
    busy.enqueue(TEXT, b"x", 8)
    busy.delivered()
    waiting.enqueue(TEXT, b"x", 0)  # a frame still queued: the backend is slow, not the client idle
    assert connections.expired(9) == []
    assert connections.expired(10.5) == [(idle, "idle timeout")]
    busy.sent(3, 99)
    assert {(c.id, why) for c, why in connections.expired(100)} == {
        (c.id, "maximum connection time reached") for c in (idle, busy, waiting)
    }
    idle.open = False
    assert idle not in [c for c, _ in connections.expired(100)]


def test_the_queue_counts_frames_and_bytes() -> None:
    config = GatewayConfig(queue_frames=3, queue_bytes=10)
    conn = table().add("a", "f", None, (), 0)
    assert conn.has_room(config)
    conn.enqueue(TEXT, b"12345", 1)
    conn.enqueue(BINARY, b"12345", 2)
    assert not conn.has_room(config)  # 10 bytes
    conn.delivered()
    assert conn.has_room(config) and conn.queued_bytes == 5
    conn.enqueue(TEXT, b"", 3)
    conn.enqueue(TEXT, b"", 3)
    assert not conn.has_room(config)  # 3 frames
    assert conn.drop_queue() == 3 and conn.queued_bytes == 0 and conn.has_room(config)
    assert (conn.frames_in, conn.bytes_in, conn.last_active) == (4, 10, 3)


def test_the_callback_rate_is_a_token_bucket() -> None:
    conn = table(callback_rate=2).add("a", "f", None, (), 0)
    assert [conn.allow_callback(2, 0) for _ in range(3)] == [True, True, False]
    assert conn.allow_callback(2, 0.5) and not conn.allow_callback(2, 0.5)
    assert conn.allow_callback(2, 100) and conn.allow_callback(2, 100) and not conn.allow_callback(2, 100)


def test_the_first_end_reason_stays() -> None:
    conn = table().add("a", "f", None, (), 0)
    conn.ended(1011, "backend gone", "backend")
    conn.ended(1000, "", "client")
    assert (conn.close_code, conn.close_reason, conn.closed_by) == (1011, "backend gone", "backend")


def test_status_counts_each_way() -> None:
    conn = table().add("198.51.100.7", "f", None, (), 10)
    conn.enqueue(TEXT, b"abc", 11)
    conn.sent(5, 12)
    state = conn.status(13, 1_700_000_000)
    assert state["address"] == "198.51.100.7" and state["connected_since"] == "2023-11-14T22:13:17Z"
    assert state["from_client"] == {"frames": 1, "bytes": 3} and state["to_client"] == {"frames": 1, "bytes": 5}
    assert state["queued"] == {"frames": 1, "bytes": 3} and state["idle_seconds"] == 1


@pytest.mark.parametrize(
    ("content_type", "charset", "body", "expected"),
    [
        ("text/plain", None, b"hi", (TEXT, b"hi")),
        ("text/plain", "utf-8", "h\u00e9".encode(), (TEXT, "h\u00e9".encode())),
        ("text/html", "US-ASCII", b"<b>", (TEXT, b"<b>")),
        ("text/plain", "latin-1", b"\xe9", (None, "a text/* body must be UTF-8")),
        ("text/plain", None, b"\xff", (None, "the text/* body is not valid UTF-8")),
        ("application/octet-stream", None, b"\xff", (BINARY, b"\xff")),
        ("application/json", None, b"{}", (BINARY, b"{}")),
        ("application/octet-stream", None, b"", (BINARY, b"")),
    ],
)
def test_what_a_callback_body_becomes(content_type: str, charset: str | None, body: bytes, expected: object) -> None:
    assert callback_frame(content_type, charset, body) == expected


def test_the_signature_is_an_hmac_over_time_callback_and_body() -> None:
    value = sign(b"k", "https://gw/ID", b"body", now=1_700_000_000.7)
    stamp, digest = value.split(",")
    assert stamp == "t=1700000000"
    assert digest == "sha256=" + hmac.new(b"k", b"1700000000.https://gw/ID.body", hashlib.sha256).hexdigest()
    assert sign(b"k", "https://gw/OTHER", b"body", now=1_700_000_000) != value


def test_log_text_is_escaped_and_cut() -> None:
    assert shown("a\x1b[2J\nb") == "'a\\x1b[2J\\nb'"
    assert shown("x" * 500, 10) == repr("x" * 10) + "…"
    assert shown(b"\xff\x00") == repr("\ufffd\x00")


@pytest.mark.parametrize(
    ("address", "private"),
    [
        ("127.0.0.1", True),
        ("10.0.0.1", True),
        ("172.16.0.1", True),
        ("192.168.0.1", True),
        ("169.254.169.254", True),
        ("0.0.0.0", True),
        ("100.64.0.1", True),
        ("224.0.0.1", True),
        ("::1", True),
        ("fe80::1", True),
        ("fd00::1", True),
        ("::ffff:10.0.0.1", True),
        ("8.8.8.8", False),
        ("2001:4860:4860::8888", False),
        ("::ffff:8.8.8.8", False),
    ],
)
def test_private_addresses(address: str, private: bool) -> None:
    assert is_private_address(ip_address(address)) is private


def test_close_codes_and_reasons_from_a_callback() -> None:
    assert _close_args(None, None) == (1000, "")
    assert _close_args("4000", "bye") == (4000, "bye")
    assert _close_args("1001", None)[0] is None  # reserved for endpoints going away
    assert _close_args("5000", None)[0] is None
    assert _close_args("x", None)[0] is None
    assert _close_args("3000", "\u00e9" * 62)[0] is None  # 124 bytes
    assert len(_close_reason("\u00e9" * 100)) <= 123
    assert _close_reason("\u00e9" * 100).decode() == "\u00e9" * 61


def test_callback_path_follows_the_base_url() -> None:
    assert GatewayConfig(base_url="https://ws.example.com").callback_path == "/"
    assert GatewayConfig(base_url="https://ws.example.com/gw/").callback_path == "/gw/"
    assert GatewayConfig(base_url="https://ws.example.com/gw").callback_base == "https://ws.example.com/gw"


def _args(**values: object) -> argparse.Namespace:
    from rproxy_core.cli.gateway import GATEWAY_FLAGS

    namespace = argparse.Namespace(config=None, **{key: None for key in GATEWAY_FLAGS})
    for key, value in values.items():
        setattr(namespace, key, value)
    return namespace


def test_settings_from_the_environment_and_their_defaults() -> None:
    settings = gateway_settings(
        _args(),
        {
            "RPROXY_BASE_URL": "https://ws.example.com",
            "RPROXY_ALLOWLIST": r"https://a\.example/.* https://b\.example/.*",
            "RPROXY_GATEWAY_SECRET": "s3cret",
            "RPROXY_ADDRESS": "127.0.0.1:9443",
        },
    )
    config = settings.config
    assert config.allowlist == (r"https://a\.example/.*", r"https://b\.example/.*")
    assert config.secret == b"s3cret" and (settings.host, settings.port) == ("127.0.0.1", 9443)
    assert (config.max_message_size, config.idle_timeout, config.max_lifetime) == (128 << 10, 600, 7200)
    assert config.forward_headers == ("origin", "user-agent")
    assert "s3cret" not in repr(config)
    flags = gateway_settings(
        _args(
            base_url="https://ws.example.com",
            listen="0.0.0.0:1",
            forward_headers=["Cookie", "X-Client"],
            max_message_size="1M",
        ),
        {"RPROXY_LISTEN": "127.0.0.1:2"},
    )
    assert flags.port == 1 and flags.config.forward_headers == ("cookie", "x-client")
    assert flags.config.max_message_size == 1 << 20
    with pytest.raises(ConfigError, match=r"^\$RPROXY_MAX_LIFETIME: expected seconds"):
        gateway_settings(_args(base_url="https://ws.example.com"), {"RPROXY_MAX_LIFETIME": "forever"})
