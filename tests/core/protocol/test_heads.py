"""Request and response heads: JSON round trips and rejection of malformed heads."""

from __future__ import annotations

import contextlib
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rproxy_core.agent.upstream import remove_dot_segments
from rproxy_core.exceptions import RemoteProtocolError
from rproxy_core.protocol import KIND_HTTP, KIND_TCP, KIND_WEBSOCKET, RequestHead, ResponseHead

#: RFC 9110 tchar, and text without control characters but tab: what a head may hold.
_TCHARS = "!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
tokens = st.text(alphabet=_TCHARS, min_size=1, max_size=20)
field_text = st.text(alphabet=st.characters(blacklist_categories=("Cc", "Cs")) | st.just("\t"), max_size=40)
header_lists = st.lists(st.tuples(tokens, field_text), max_size=8)
any_header_lists = st.lists(st.tuples(st.text(max_size=20), st.text(max_size=40)), max_size=8)


def test_request_head_round_trips():
    """A request head decodes to an equal head after encoding."""
    head = RequestHead(
        "POST",
        "/api/states?x=1&y=%20",
        [("Host", "example.org"), ("Content-Type", "application/json")],
        KIND_HTTP,
        "req-42",
    )
    assert RequestHead.decode(head.encode()) == head


def test_request_head_keeps_duplicate_headers_in_order():
    """Repeated header names (e.g. Cookie) survive in their original order."""
    headers = [("Cookie", "a=1"), ("X", "1"), ("Cookie", "b=2"), ("cookie", "c=3")]
    decoded = RequestHead.decode(RequestHead("GET", "/", headers).encode())
    assert decoded.headers == headers


def test_response_head_keeps_duplicate_set_cookie_headers():
    """Several Set-Cookie fields stay separate and ordered."""
    head = ResponseHead(200, "OK", [("Set-Cookie", "a=1"), ("Set-Cookie", "b=2")])
    assert ResponseHead.decode(head.encode()).headers == head.headers


def test_heads_with_non_ascii_values_round_trip_as_ascii_json():
    """Non-ASCII names and values round trip, and the encoded JSON itself is pure ASCII."""
    request = RequestHead("GET", "/café/☃", [("X-Name", "Zoë ☃ 🏠"), ("X-Tab", "a\tb")])
    response = ResponseHead(404, "Nicht gefunden \u2013 ö", [("X-Emoji", "🙂")])
    for head in (request, response):
        wire = head.encode()
        wire.decode("ascii")
        assert type(head).decode(wire) == head


@pytest.mark.parametrize(
    "head",
    [
        RequestHead("GET", "/", [("X-A", "b\r\nX-Injected: 1")]),
        RequestHead("GET", "/", [("X-A", "b\x00")]),
        RequestHead("GET", "/", [("X-A", "b\x7f")]),
        RequestHead("GET", "/", [("X A", "b")]),
        RequestHead("GET", "/", [("X:A", "b")]),
        RequestHead("GET", "/", [("", "b")]),
        RequestHead("GET /x HTTP/1.1\r\n", "/"),
        RequestHead("G T", "/"),
        RequestHead("GET", "/a b"),
        RequestHead("GET", "/a\r\nX: 1"),
        ResponseHead(200, "OK\r\nX-Injected: 1"),
        ResponseHead(200, "OK\x1b[2J"),
        ResponseHead(200, "", [("Set-Cookie", "a=1\nb=2")]),
        ResponseHead(200, "", [("Bad Name", "v")]),
    ],
)
def test_heads_that_cannot_be_written_as_http_are_refused(head: RequestHead | ResponseHead) -> None:
    """A decoded head can go into an HTTP/1.1 message as it is: no line breaks, no controls,
    methods and header names are tokens (issue 15, finding 1)."""
    with pytest.raises(RemoteProtocolError):
        type(head).decode(head.encode())


def test_websocket_request_head_round_trips():
    """The websocket kind is preserved."""
    head = RequestHead("GET", "/ws", [("Upgrade", "websocket")], KIND_WEBSOCKET, "r")
    assert RequestHead.decode(head.encode()).kind == KIND_WEBSOCKET


def test_request_head_defaults_apply_to_missing_optional_fields():
    """Headers, kind and request id are optional on the wire."""
    head = RequestHead.decode(b'{"m":"GET","t":"/"}')
    assert head == RequestHead("GET", "/", [], KIND_HTTP, "")


def test_response_head_defaults_apply_to_missing_optional_fields():
    """Reason and headers are optional on the wire."""
    assert ResponseHead.decode(b'{"s":204}') == ResponseHead(204, "", [])


def test_heads_decode_from_a_memoryview():
    """decode accepts the memoryview payload a Frame carries."""
    assert RequestHead.decode(memoryview(b'{"m":"GET","t":"/"}')).method == "GET"
    assert ResponseHead.decode(memoryview(b'{"s":200}')).status == 200


def test_heads_ignore_unknown_fields():
    """Unknown JSON keys are ignored, leaving room for later extensions."""
    assert RequestHead.decode(b'{"m":"GET","t":"/","zz":[1,2]}').target == "/"


@given(
    method=tokens,
    target=st.text(alphabet=st.characters(blacklist_categories=("Cc", "Cs", "Zs")), max_size=50),
    headers=header_lists,
    kind=st.sampled_from([KIND_HTTP, KIND_WEBSOCKET]),
    request_id=st.text(max_size=20),
)
@settings(max_examples=200, deadline=None, database=None)
def test_any_request_head_round_trips(method, target, headers, kind, request_id):
    """Every writable request head survives encode/decode unchanged."""
    head = RequestHead(method, target, headers, kind, request_id)
    assert RequestHead.decode(head.encode()) == head


@given(status=st.integers(100, 599), reason=field_text, headers=header_lists)
@settings(max_examples=200, deadline=None, database=None)
def test_any_response_head_round_trips(status, reason, headers):
    """Every writable response head with a valid status survives encode/decode unchanged."""
    head = ResponseHead(status, reason, headers)
    assert ResponseHead.decode(head.encode()) == head


@given(method=st.text(max_size=10), target=st.text(max_size=50), headers=any_header_lists, reason=st.text(max_size=30))
@settings(max_examples=200, deadline=None, database=None)
def test_any_head_round_trips_or_is_refused(method, target, headers, reason):
    """Whatever strings a peer puts in a head, decoding gives it back or refuses it cleanly."""
    for head in (RequestHead(method, target, headers), ResponseHead(200, reason, headers)):
        try:
            decoded = type(head).decode(head.encode())
        except RemoteProtocolError:
            continue
        assert decoded == head
        for name, value in decoded.headers:
            assert name and not any(c in name for c in ' :\r\n\x00"(),/;<=>?@[\\]{}')
            assert not any(c in value for c in "\r\n\x00")


MALFORMED_JSON = [
    pytest.param(b"", id="empty"),
    pytest.param(b"{", id="truncated"),
    pytest.param(b"{'m': 'GET'}", id="single-quotes"),
    pytest.param(b"\xff\xfe\xfd", id="not-utf8"),
    pytest.param(b'{"m":"GET","t":"/"} trailing', id="trailing-garbage"),
    pytest.param(b"[]", id="array"),
    pytest.param(b'"GET /"', id="string"),
    pytest.param(b"null", id="null"),
    pytest.param(b"42", id="number"),
    pytest.param(b"NaN", id="nan"),
]


@pytest.mark.parametrize("payload", MALFORMED_JSON)
def test_request_head_rejects_payloads_that_are_not_a_json_object(payload):
    """A payload that is not a JSON object is a RemoteProtocolError."""
    with pytest.raises(RemoteProtocolError):
        RequestHead.decode(payload)


@pytest.mark.parametrize("payload", MALFORMED_JSON)
def test_response_head_rejects_payloads_that_are_not_a_json_object(payload):
    """A payload that is not a JSON object is a RemoteProtocolError."""
    with pytest.raises(RemoteProtocolError):
        ResponseHead.decode(payload)


@pytest.mark.parametrize(
    "obj",
    [
        pytest.param({"t": "/"}, id="missing-method"),
        pytest.param({"m": "GET"}, id="missing-target"),
        pytest.param({"m": 1, "t": "/"}, id="method-int"),
        pytest.param({"m": None, "t": "/"}, id="method-null"),
        pytest.param({"m": "GET", "t": ["/"]}, id="target-list"),
        pytest.param({"m": "GET", "t": "/", "h": {"Host": "x"}}, id="headers-object"),
        pytest.param({"m": "GET", "t": "/", "h": "Host: x"}, id="headers-string"),
        pytest.param({"m": "GET", "t": "/", "h": [["Host"]]}, id="header-one-item"),
        pytest.param({"m": "GET", "t": "/", "h": [["Host", "x", "y"]]}, id="header-three-items"),
        pytest.param({"m": "GET", "t": "/", "h": [["Host", 1]]}, id="header-value-int"),
        pytest.param({"m": "GET", "t": "/", "h": [[None, "x"]]}, id="header-name-null"),
        pytest.param({"m": "GET", "t": "/", "h": ["Host: x"]}, id="header-string"),
        pytest.param({"m": "GET", "t": "/", "h": [{"Host": "x"}]}, id="header-object"),
        pytest.param({"m": "GET", "t": "/", "k": "ftp"}, id="unknown-kind"),
        pytest.param({"m": "GET", "t": "/", "k": "HTTP"}, id="kind-wrong-case"),
        pytest.param({"m": "GET", "t": "/", "k": 1}, id="kind-int"),
        pytest.param({"m": "GET", "t": "/", "k": None}, id="kind-null"),
        pytest.param({"m": "GET", "t": "/", "i": 7}, id="request-id-int"),
    ],
)
def test_request_head_rejects_wrong_field_types(obj):
    """Missing or mistyped request-head fields and unknown kinds are RemoteProtocolError."""
    with pytest.raises(RemoteProtocolError):
        RequestHead.decode(json.dumps(obj).encode())


@pytest.mark.parametrize(
    "obj",
    [
        pytest.param({}, id="missing-status"),
        pytest.param({"s": None}, id="status-null"),
        pytest.param({"s": "200"}, id="status-string"),
        pytest.param({"s": 200.0}, id="status-float"),
        pytest.param({"s": True}, id="status-bool"),
        pytest.param({"s": 99}, id="status-99"),
        pytest.param({"s": 600}, id="status-600"),
        pytest.param({"s": -200}, id="status-negative"),
        pytest.param({"s": 200, "r": 1}, id="reason-int"),
        pytest.param({"s": 200, "h": [["A", "b"], ["C"]]}, id="header-one-item"),
        pytest.param({"s": 200, "h": {"A": "b"}}, id="headers-object"),
    ],
)
def test_response_head_rejects_bad_status_and_wrong_field_types(obj):
    """An out-of-range or non-integer status and mistyped fields are RemoteProtocolError."""
    with pytest.raises(RemoteProtocolError):
        ResponseHead.decode(json.dumps(obj).encode())


@pytest.mark.parametrize("status", [100, 101, 200, 599])
def test_response_head_accepts_boundary_statuses(status):
    """Statuses 100 through 599 inclusive are accepted."""
    assert ResponseHead.decode(json.dumps({"s": status}).encode()).status == status


@pytest.mark.parametrize("decode", [RequestHead.decode, ResponseHead.decode], ids=["request", "response"])
def test_deeply_nested_json_head_is_a_remote_protocol_error(decode):
    """A hostile head nested thousands of levels deep is rejected as RemoteProtocolError, not RecursionError."""
    payload = b'{"h":' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    with pytest.raises(RemoteProtocolError):
        decode(payload)


@given(payload=st.binary(max_size=80))
@settings(max_examples=200, deadline=None, database=None)
def test_decoding_arbitrary_bytes_raises_only_remote_protocol_error(payload):
    """Whatever the bytes, decode returns a head or raises RemoteProtocolError."""
    for decode in (RequestHead.decode, ResponseHead.decode):
        with contextlib.suppress(RemoteProtocolError):
            decode(payload)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**40), 2**40) | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=3), inner, max_size=3),
    max_leaves=10,
)


@given(obj=st.dictionaries(st.sampled_from(["m", "t", "h", "k", "i", "s", "r", "x"]), json_values, max_size=6))
@settings(max_examples=300, deadline=None, database=None)
def test_decoding_arbitrary_json_objects_raises_only_remote_protocol_error(obj):
    """Any JSON object, however its fields are typed, decodes or raises RemoteProtocolError."""
    payload = json.dumps(obj).encode()
    for decode in (RequestHead.decode, ResponseHead.decode):
        try:
            head = decode(payload)
        except RemoteProtocolError:
            continue
        for name, value in head.headers:
            assert isinstance(name, str) and isinstance(value, str)


def test_service_and_tcp_kind_round_trip_and_the_main_app_sends_no_service_field():
    """A head for a TCP service keeps its kind and service; a head for the main web app leaves
    the service field off the wire (older agents never see it)."""
    head = RequestHead("CONNECT", "", [("X-Forwarded-For", "192.0.2.7")], KIND_TCP, "r1", service="ssh")
    assert RequestHead.decode(head.encode()) == head
    assert b'"v"' not in RequestHead("GET", "/").encode()
    assert RequestHead.decode(b'{"m":"GET","t":"/"}').service == ""


def test_request_head_with_a_non_string_service_is_refused():
    """A service that is not a string is a protocol error, not a crash later."""
    with pytest.raises(RemoteProtocolError, match="'v'"):
        RequestHead.decode(b'{"m":"GET","t":"/","v":7}')


def test_dot_segments_are_removed_and_climbing_out_is_refused() -> None:
    """The agent's target normalization (RFC 3986 §5.2.4, issue 15 finding 9)."""
    assert remove_dot_segments("/a/./b/../c?q=/../") == "/a/c?q=/../"
    assert remove_dot_segments("/x/%2e%2E/y") == "/y"
    assert remove_dot_segments("/x/..") == "/"
    assert remove_dot_segments("/a..b/.c/c.") == "/a..b/.c/c."
    for target in ("/../a", "/%2e%2e/a", "/x/../../a", "/..%2fa", "/..%5Ca", "/..\\a", "/x/.%2E/.."):
        assert remove_dot_segments(target) is None, target
