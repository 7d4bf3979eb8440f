"""TunnelConnection and TunnelStream over the in-memory frame-socket pair: requests, resets, limits, endings."""

from __future__ import annotations

import asyncio

import pytest

from rproxy_core.exceptions import StreamResetError, TunnelClosedError
from rproxy_core.protocol import Multiplexer, Role
from rproxy_core.protocol.frames import ErrorCode, MessageKind
from rproxy_core.protocol.heads import KIND_WEBSOCKET, RequestHead, ResponseHead
from rproxy_core.transport import HandshakeError, TunnelConnection, TunnelStream

from .framesockets import running_tunnel, socket_pair

GET = RequestHead("GET", "/", [("Host", "home.test")])
#: The default stream window: bodies beyond it need the reader's WINDOW_UPDATEs to get through.
WINDOW = Multiplexer(Role.AGENT).stream_window


async def read_all(stream: TunnelStream) -> bytes:
    """Every body byte of ``stream`` until the peer ends its half."""
    body = bytearray()
    while chunk := await stream.read():
        body += chunk
    return bytes(body)


async def echo(stream: TunnelStream) -> None:
    """An agent-side handler: answers 200 with the request body."""
    body = await read_all(stream)
    stream.send_reply(ResponseHead(200, "OK", [("Content-Length", str(len(body)))]))
    await stream.write(body, end_stream=True)


@pytest.mark.parametrize("size", [0, 1, 70_000, WINDOW + 1, 3 * WINDOW + 17], ids=lambda s: f"{s}B")
async def test_a_request_body_comes_back_whole_through_flow_control(size: int) -> None:
    """Bodies of every size, also several stream windows, arrive whole and in order."""
    body = bytes(i % 251 for i in range(size))
    async with running_tunnel(echo) as tunnel, asyncio.timeout(10):
        stream = tunnel.bridge.open_stream(GET)
        writing = asyncio.create_task(stream.write(body, end_stream=True))
        reply = await stream.reply()
        assert (await read_all(stream), reply.status) == (body, 200)
        await writing
        assert stream.bytes_sent == size
        assert tunnel.served[0].head == GET


async def test_streams_are_independent_and_each_gets_its_own_answer() -> None:
    """Ten concurrent streams each get the answer to their own request."""
    async with running_tunnel(echo) as tunnel, asyncio.timeout(10):
        streams = [tunnel.bridge.open_stream(RequestHead("POST", f"/{n}")) for n in range(10)]

        async def exchange(n: int, stream: TunnelStream) -> bytes:
            await stream.write(f"body {n}".encode(), end_stream=True)
            await stream.reply()
            return await read_all(stream)

        answers = await asyncio.gather(*(exchange(n, s) for n, s in enumerate(streams)))
        assert answers == [f"body {n}".encode() for n in range(10)]
        assert [s.head.target for s in tunnel.served] == [f"/{n}" for n in range(10)]


async def test_websocket_messages_keep_their_kind_and_boundaries() -> None:
    """Text, binary, ping and an empty message cross one by one, each with its kind."""
    messages = [
        (MessageKind.TEXT, b"hello"),
        (MessageKind.BINARY, b"\x00\xff" * 1000),
        (MessageKind.PING, b"p"),
        (MessageKind.BINARY, b""),
    ]

    async def relay_back(stream: TunnelStream) -> None:
        stream.send_reply(ResponseHead(101, "Switching Protocols"))
        while (message := await stream.read_message(1 << 20)) is not None:
            await stream.send_message(*message)
        await stream.end()

    async with running_tunnel(relay_back) as tunnel, asyncio.timeout(10):
        stream = tunnel.bridge.open_stream(RequestHead("GET", "/ws", kind=KIND_WEBSOCKET))
        assert (await stream.reply()).status == 101
        for kind, data in messages:
            await stream.send_message(kind, data)
        await stream.end()
        received = []
        while (message := await stream.read_message(1 << 20)) is not None:
            received.append(message)
        assert received == messages


@pytest.mark.parametrize(
    "code",
    [ErrorCode.CANCEL, ErrorCode.REFUSED_STREAM, ErrorCode.INTERNAL_ERROR],
    ids=lambda c: ErrorCode(c).name,
)
async def test_an_agent_reset_reaches_the_bridge_with_its_code(code: ErrorCode) -> None:
    """The agent resetting a stream fails the bridge's wait for the reply with that code; the tunnel lives on."""

    async def refuse(stream: TunnelStream) -> None:
        stream.reset(code, "no")

    async with running_tunnel(refuse) as tunnel, asyncio.timeout(10):
        stream = tunnel.bridge.open_stream(GET, end_stream=True)
        with pytest.raises(StreamResetError) as caught:
            await stream.reply()
        assert caught.value.code == code
        assert not tunnel.bridge.closed
        await asyncio.sleep(0)  # let the reset stream leave the table
        assert tunnel.bridge.open_stream(GET, end_stream=True) is not None


async def test_closing_fails_open_streams_and_refuses_new_ones() -> None:
    """A closing tunnel fails every stream on both ends, calls on_close once, and opens nothing more."""
    closed: list[TunnelConnection] = []
    hold = asyncio.Event()

    async def wait_forever(stream: TunnelStream) -> None:
        await hold.wait()

    async with running_tunnel(wait_forever) as tunnel, asyncio.timeout(10):
        tunnel.bridge.on_close(closed.append)
        stream = tunnel.bridge.open_stream(GET, end_stream=True)
        while not tunnel.served:
            await asyncio.sleep(0)
        await tunnel.bridge.close()
        with pytest.raises(TunnelClosedError):
            await stream.reply()
        with pytest.raises(StreamResetError):
            await tunnel.served[0].read()
        with pytest.raises(TunnelClosedError):
            tunnel.bridge.open_stream(GET)
        tunnel.bridge.on_close(closed.append)  # registered late: called at once
        assert closed == [tunnel.bridge, tunnel.bridge]
        assert tunnel.bridge_socket.close_code == 1000
        assert tunnel.agent.close_reason.startswith("peer said goodbye")


async def test_the_peers_stream_limit_is_kept() -> None:
    """Past the stream limit the agent announced, open_stream refuses; a finished stream frees a slot."""
    hold = asyncio.Event()

    async def wait(stream: TunnelStream) -> None:
        await hold.wait()
        stream.send_reply(ResponseHead(204), end_stream=True)

    async with running_tunnel(wait, agent_mux=Multiplexer(Role.AGENT, max_streams=2)) as tunnel, asyncio.timeout(10):
        first, _second = (tunnel.bridge.open_stream(GET, end_stream=True) for _ in range(2))
        with pytest.raises(TunnelClosedError, match="too many streams"):
            tunnel.bridge.open_stream(GET, end_stream=True)
        hold.set()
        assert (await first.reply()).status == 204
        for _ in range(100):  # both replies end both streams; bounded
            if tunnel.bridge.mux.can_open_stream():
                break
            await asyncio.sleep(0.01)
        assert tunnel.bridge.open_stream(GET, end_stream=True) is not None


async def test_a_text_message_is_a_protocol_error_that_ends_the_tunnel() -> None:
    """A peer sending text (not our protocol) gets a GOAWAY and a 1002 close; the reason is logged escaped."""
    async with running_tunnel() as tunnel, asyncio.timeout(10):
        tunnel.agent_socket.send_text("hello")
        while not tunnel.bridge.closed:
            await asyncio.sleep(0.01)
        assert tunnel.bridge.mux.error is not None
        assert tunnel.bridge_socket.close_code == 1002


async def test_a_silent_peer_is_declared_dead() -> None:
    """A peer that said HELLO and then nothing for ``dead_after`` seconds: the tunnel closes, saying so."""
    ours, theirs = socket_pair()
    silent = Multiplexer(Role.AGENT)  # answers the handshake, then never reads nor writes again
    silent.send_hello()
    await theirs.send(b"".join(silent.data_to_send()))
    connection = TunnelConnection(ours, Multiplexer(Role.BRIDGE), label="test", heartbeat_interval=0.05, dead_after=0.2)
    async with asyncio.timeout(10):
        await connection.handshake(timeout=1)
        await connection.run()
    assert connection.close_reason == "peer silent for 0s"
    assert connection.closed and ours.closed


@pytest.mark.parametrize("peer", ["closes", "is silent"])
async def test_a_handshake_without_hello_fails(peer: str) -> None:
    """A peer that closes before its HELLO, or never sends one, fails the handshake with a HandshakeError."""
    ours, theirs = socket_pair()
    connection = TunnelConnection(ours, Multiplexer(Role.BRIDGE), label="test")
    if peer == "closes":
        await theirs.close()
    with pytest.raises(HandshakeError, match="closed before HELLO" if peer == "closes" else "no HELLO within"):
        await connection.handshake(timeout=0.05)
    assert theirs.closed or len(ours.sent) == 1  # our HELLO went out (or the socket was already closed)
