"""Fuzzing the agent handshake: whatever an authenticated agent sends first, the bridge ends it cleanly.

Over a real socket to a real in-process Bridge: after the upgrade, hypothesis plays the agent
with arbitrary bytes and arbitrary frames (a valid HELLO among them, so the fuzzing goes on
past the handshake); text messages, which the tunnel never carries, are tried on their own.
Each example must end with the bridge closing the tunnel
(a GOAWAY naming a protocol error, then the WebSocket close), one logged reason, no exception
in any log, no task or tunnel left behind, within a few seconds.

The HELLO parser is also fuzzed sans-I/O against an exact oracle of what it must accept.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import logging
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path

import aiohttp
import pytest
from aiohttp import WSMsgType
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rproxy_core import Bridge, BridgeConfig
from rproxy_core.const import CONNECT_PATH, HEADER_PROTOCOL, HEADER_TUNNEL
from rproxy_core.exceptions import FrameError
from rproxy_core.protocol import ErrorCode, FrameType, Multiplexer, Role
from rproxy_core.protocol import events as ev
from rproxy_core.protocol.frames import decode_code, encode_code, iter_frames
from tests.conftest import ROOT, TOKEN

from .helpers import parse, raw_frame, raw_hello, ready_mux, take
from .test_fuzz import json_values, messages

#: Each example opens a real connection: fewer than the sans-I/O tests, each bounded in time.
OVER_SOCKETS = settings(
    max_examples=100,
    deadline=timedelta(seconds=10),
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
#: Every example ends with this, which no state of the protocol accepts (a truncated header),
#: so the bridge must close even if the fuzzed input happened to be a clean HELLO.
NEVER_VALID = b"\x00"
#: Time for one attack, from the upgrade to the bridge's cleanup.
ATTACK_TIMEOUT = 8.0


class Records(logging.Handler):
    """Every record of the bridge's loggers (and asyncio's), kept for the current example."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@contextmanager
def recorded_logs() -> Iterator[Records]:
    handler = Records()
    loggers = [logging.getLogger(name) for name in ("rproxy", "aiohttp", "asyncio")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.addHandler(handler)
        logger.setLevel(logging.DEBUG)
    try:
        yield handler
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.removeHandler(handler)
            logger.setLevel(level)


Message = bytes | str  # a binary WebSocket message, or a text one (which the tunnel never carries)

first_messages = st.lists(
    st.one_of(
        st.binary(max_size=64),
        messages,
        st.just(raw_hello()),
        st.builds(lambda rest: raw_hello() + rest, messages),
        st.text(max_size=20),
    ),
    min_size=1,
    max_size=4,
)


class HandshakeFuzzer:
    """One bridge for a whole hypothesis run, attacked once per example."""

    def __init__(self, runner: asyncio.Runner) -> None:
        self.runner = runner
        self.bridge = Bridge(BridgeConfig(host="127.0.0.1", port=0, tokens=[TOKEN], access_log=False))
        self.baseline: set[asyncio.Task[object]] = set()

    async def start(self) -> None:
        await self.bridge.start()
        self.baseline = self._other_tasks()

    def _other_tasks(self) -> set[asyncio.Task[object]]:
        return asyncio.all_tasks() - {asyncio.current_task()}  # type: ignore[operator]

    async def attack(self, inputs: list[Message], logs: Records) -> None:
        headers = {"Authorization": f"Bearer {TOKEN}", HEADER_PROTOCOL: "1", HEADER_TUNNEL: "fuzz"}
        url = self.bridge.url.replace("http", "ws", 1) + CONNECT_PATH
        received: list[bytes] = []
        async with asyncio.timeout(ATTACK_TIMEOUT):
            async with aiohttp.ClientSession() as session, session.ws_connect(url, headers=headers) as ws:
                for message in [*inputs, NEVER_VALID]:
                    if ws.closed:
                        break
                    if isinstance(message, str):
                        await ws.send_str(message)
                    else:
                        await ws.send_bytes(message)
                while True:
                    reply = await ws.receive()
                    if reply.type is not WSMsgType.BINARY:
                        break
                    received.append(reply.data)
                assert reply.type in (WSMsgType.CLOSE, WSMsgType.CLOSED, WSMsgType.CLOSING), reply
                close_code = ws.close_code
            await self._wait_cleaned_up()
        self._check_answer(received, close_code)
        self._check_logs(logs.records)

    def _check_answer(self, received: list[bytes], close_code: int | None) -> None:
        frames = [frame for message in received for frame in parse(message)]
        assert frames and frames[0].type is FrameType.HELLO  # the bridge's own, sent at once
        goaways = [frame for frame in frames if frame.type is FrameType.GOAWAY]
        assert len(goaways) == 1 and frames[-1] is goaways[0], [f.type for f in frames]
        code, reason = decode_code(goaways[0].payload)
        # The agent's own GOAWAY ends a tunnel cleanly; anything else is the agent's fault.
        assert code in (
            ErrorCode.PROTOCOL_ERROR,
            ErrorCode.FRAME_SIZE_ERROR,
            ErrorCode.FLOW_CONTROL_ERROR,
            ErrorCode.NO_ERROR,
        ), code
        assert reason
        assert close_code in (1000, 1002), close_code

    async def _wait_cleaned_up(self) -> None:
        bridge = self.bridge
        while bridge._agents.handshaking() or bridge.registry.connections() or self._other_tasks() - self.baseline:
            await asyncio.sleep(0.01)

    @staticmethod
    def _check_logs(records: list[logging.LogRecord]) -> None:
        assert not [r for r in records if r.exc_info or r.levelno >= logging.ERROR], [r.getMessage() for r in records]
        endings = [
            r.getMessage()
            for r in records
            if "failed its handshake: " in r.getMessage() or " disconnected: " in r.getMessage()
        ]
        assert len(endings) == 1, [r.getMessage() for r in records]
        assert not endings[0].endswith(": "), endings


def run_fuzzer(test: object) -> None:
    """Run the hypothesis test ``test(fuzzer, inputs)`` against one bridge on one event loop."""
    with asyncio.Runner() as runner:
        fuzzer = HandshakeFuzzer(runner)
        runner.run(fuzzer.start())
        try:
            test(fuzzer)  # type: ignore[operator]
        finally:
            runner.run(fuzzer.bridge.stop())


def attack_with(fuzzer: HandshakeFuzzer, inputs: list[Message]) -> None:
    with recorded_logs() as logs:
        fuzzer.runner.run(fuzzer.attack(inputs, logs))


def test_any_first_messages_end_in_a_clean_close() -> None:
    """Bytes, frames, HELLO followed by junk and text messages: always GOAWAY, a close and a logged reason."""

    def fuzz(fuzzer: HandshakeFuzzer) -> None:
        @given(inputs=first_messages)
        @OVER_SOCKETS
        def attack(inputs: list[Message]) -> None:
            attack_with(fuzzer, inputs)

        attack()

    run_fuzzer(fuzz)


@pytest.mark.parametrize(
    "inputs",
    [
        pytest.param(["not a frame"], id="before-hello"),
        pytest.param([raw_hello(), "not a frame"], id="after-hello"),
    ],
)
def test_a_text_message_ends_the_tunnel_cleanly(inputs: list[Message]) -> None:
    run_fuzzer(lambda fuzzer: attack_with(fuzzer, inputs))


def test_the_handshake_oracle_sees_a_silent_bridge() -> None:
    """The checks can fail: a tunnel that ends without the bridge's GOAWAY is caught."""
    fuzzer = HandshakeFuzzer(None)  # type: ignore[arg-type]
    hello = raw_hello()
    try:
        fuzzer._check_answer([hello], 1000)
    except AssertionError:
        pass
    else:
        raise AssertionError("a close without GOAWAY passed the oracle")
    goaway = raw_frame(FrameType.GOAWAY, 0, 0, encode_code(ErrorCode.PROTOCOL_ERROR, "bad"))
    fuzzer._check_answer([hello, goaway], 1002)
    record = logging.LogRecord("rproxy.bridge.http", logging.ERROR, __file__, 1, "Error handling request", (), None)
    try:
        fuzzer._check_logs([record])
    except AssertionError:
        pass
    else:
        raise AssertionError("an ERROR record passed the oracle")


# The HELLO parser, sans-I/O, against what it must accept.

#: As in HTTP/2: a window up to 2**31 - 1; frames from 16 KiB to 16 MiB.
_RANGES = {"window": (1, 2**31 - 1), "max_frame": (16 << 10, 16 << 20), "max_streams": (1, 1 << 20)}


def hello_is_valid(body: object) -> bool:
    """The specification of an acceptable HELLO, written independently of the parser."""
    if not isinstance(body, dict):
        return False
    version = body.get("version")
    if type(version) is not int or version != 1:
        return False
    for key, (low, high) in _RANGES.items():
        if key in body and not (type(body[key]) is int and low <= body[key] <= high):
            return False
    return True


settings_values = st.one_of(
    st.integers(-(2**40), 2**40),
    st.sampled_from(
        [0, 1, 16 << 10, (16 << 10) - 1, 16 << 20, (16 << 20) + 1, 2**31 - 1, 2**31, 1 << 20, (1 << 20) + 1]
    ),
    st.booleans(),
    st.floats(allow_nan=False, allow_infinity=False),
    json_values,
)
hello_bodies = st.one_of(
    st.fixed_dictionaries(
        {"version": st.one_of(st.just(1), settings_values)},
        optional={key: settings_values for key in (*_RANGES, "name", "heartbeat")},
    ),
    json_values,
)


@given(body=hello_bodies)
@settings(max_examples=1500, deadline=None, database=None)
def test_hello_is_accepted_exactly_when_it_is_valid(body: object) -> None:
    mux = Multiplexer(Role.BRIDGE)
    mux.send_hello()
    take(mux)
    mux.receive_data(raw_frame(FrameType.HELLO, 0, 0, json.dumps(body).encode()))
    events = mux.events_received()
    output = parse(take(mux))
    if hello_is_valid(body):
        assert events == [ev.HelloReceived(body)]  # type: ignore[arg-type]
        assert output == [] and not mux.closed
        assert mux.peer_settings == body
    else:
        assert len(events) == 1 and isinstance(events[0], ev.ConnectionTerminated)
        assert events[0].code == ErrorCode.PROTOCOL_ERROR and not events[0].remote
        assert [f.type for f in output] == [FrameType.GOAWAY]
        assert mux.closed and mux.peer_settings is None


@given(payload=st.one_of(st.binary(max_size=200), st.text(max_size=50).map(str.encode)))
@settings(max_examples=1000, deadline=None, database=None)
def test_a_hello_of_any_bytes_is_accepted_or_refused_with_a_goaway(payload: bytes) -> None:
    mux = Multiplexer(Role.BRIDGE)
    mux.send_hello()
    take(mux)
    mux.receive_data(raw_frame(FrameType.HELLO, 0, 0, payload))
    events = mux.events_received()
    try:
        body = json.loads(payload)
    except (ValueError, RecursionError):
        body = None
    if body is not None and hello_is_valid(body):
        assert [type(e) for e in events] == [ev.HelloReceived]
    else:
        assert [type(e) for e in events] == [ev.ConnectionTerminated]
        assert [f.type for f in parse(take(mux))] == [FrameType.GOAWAY]


def test_a_deeply_nested_hello_is_refused_not_a_crash() -> None:
    mux = Multiplexer(Role.BRIDGE)
    mux.send_hello()
    take(mux)
    mux.receive_data(raw_frame(FrameType.HELLO, 0, 0, b"[" * 100_000 + b"]" * 100_000))
    (event,) = mux.events_received()
    assert isinstance(event, ev.ConnectionTerminated) and event.code == ErrorCode.PROTOCOL_ERROR


# A bounded coverage-guided run with atheris (libFuzzer), as a process of its own: atheris
# takes over the process and exits it when done.

#: How long the atheris run lasts.
ATHERIS_SECONDS = 20
_DECODER_LIMIT = 16 << 10


def decode_any_bytes(data: bytes) -> None:
    """The frame decoder and both states of a bridge's mux, fed the same bytes: only FrameError may come out of
    the decoder, nothing out of receive_data, and whatever the mux answers must itself decode."""
    with contextlib.suppress(FrameError):
        for frame in iter_frames(data, _DECODER_LIMIT):
            assert len(frame.payload) <= _DECODER_LIMIT
    waiting = Multiplexer(Role.BRIDGE)
    waiting.send_hello()
    take(waiting)
    for mux in (waiting, ready_mux(Role.BRIDGE)):
        mux.receive_data(data)
        events = mux.events_received()
        parse(take(mux))
        assert mux.closed == any(isinstance(e, ev.ConnectionTerminated) for e in events)


def decode_with_a_planted_bug(data: bytes) -> None:
    """A decoder that forgets unknown frame types raise: the run must find it (the run can fail)."""
    decode_any_bytes(data)
    if len(data) >= 1:
        FrameType(data[0])


def atheris(tmp_path: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "tests.core.protocol.test_fuzz_handshake",
            *extra,
            f"-max_total_time={ATHERIS_SECONDS}",
            f"-artifact_prefix={tmp_path}/",
            "-rss_limit_mb=2048",
            "-timeout=10",
            "-print_final_stats=1",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=ATHERIS_SECONDS + 120,
    )


def test_atheris_finds_no_crash_in_the_frame_decoder(tmp_path: Path) -> None:
    result = atheris(tmp_path)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "Done" in result.stderr and "stat::number_of_executed_units" in result.stderr, result.stderr[-4000:]
    assert list(tmp_path.glob("crash-*")) == []


def test_atheris_finds_a_planted_bug(tmp_path: Path) -> None:
    result = atheris(tmp_path, "--planted-bug")
    output = result.stdout + result.stderr  # atheris prints the Python traceback on stdout
    assert result.returncode != 0
    assert "Uncaught Python exception" in output and "is not a valid FrameType" in output, output[-4000:]
    assert list(tmp_path.glob("crash-*"))


if __name__ == "__main__":
    import atheris as _atheris  # only here: the test suite itself does not need it

    # Coverage feedback from the protocol code only: instrumenting everything loaded (aiohttp,
    # hypothesis...) takes over a minute before the first input.
    from rproxy_core import protocol

    for module_name in ("events", "frames", "heads", "mux", "stream", "windows"):
        module = getattr(protocol, module_name)
        for value in vars(module).values():
            if getattr(value, "__module__", None) != module.__name__:
                continue
            functions = vars(value).values() if isinstance(value, type) else [value]
            for function in functions:
                if inspect.isfunction(function):
                    _atheris.instrument_func(function)
    planted = "--planted-bug" in sys.argv
    _atheris.Setup(
        [arg for arg in sys.argv if arg != "--planted-bug"], decode_with_a_planted_bug if planted else decode_any_bytes
    )
    _atheris.Fuzz()
