"""Defaults and limits, each with the reason for its value."""

from __future__ import annotations

#: Path prefix reserved for the bridge's own endpoints; everything else is visitor traffic.
RESERVED_PREFIX = "/_rproxy/"
CONNECT_PATH = "/_rproxy/connect"
#: Where a key-holding agent gets the nonce it signs before connecting.
CHALLENGE_PATH = "/_rproxy/challenge"
HEALTH_PATH = "/_rproxy/health"
#: Prometheus metrics and the status data; both need the admin token, and are off without one.
METRICS_PATH = "/_rproxy/metrics"
STATUS_JSON_PATH = "/_rproxy/status.json"
STATUS_PAGE_PATH = "/_rproxy/status"
#: Where visitors open raw TCP channels: ``/_rproxy/tcp/<tunnel>/<service>`` (PROTOCOL.md §8).
TCP_PATH = "/_rproxy/tcp"

#: HTTP headers of the agent's upgrade request (docs/PROTOCOL.md §1).
HEADER_PROTOCOL = "Rproxy-Protocol"
HEADER_TUNNEL = "Rproxy-Tunnel"
HEADER_AGENT_ID = "Rproxy-Agent-Id"

#: Heartbeat: a PING every 10 s; a peer silent for 30 s (three missed pings) is dead.
HEARTBEAT_INTERVAL = 10.0
DEAD_AFTER = 30.0
#: A peer that has not completed the HELLO exchange in this time is dropped.
HANDSHAKE_TIMEOUT = 10.0

#: Time the home app has to send its response head before the visitor gets 504.
REQUEST_TIMEOUT = 30.0
#: Seconds a stopping bridge (SIGTERM) gives requests in flight before it closes the tunnels:
#: a download or a slow API call usually ends within it, and systemd's default stop timeout
#: (90 s) is far off. The same for an embedded Bridge and for ``rproxy bridge``.
SHUTDOWN_GRACE = 10.0

#: Time a visitor has to send a whole request head, from its first byte (or from connecting),
#: before the bridge answers 408 and hangs up: ample for a phone on a bad link, short enough
#: that a client trickling bytes (slowloris) cannot hold connections for long.
HEADER_TIMEOUT = 10.0
#: A kept-alive visitor connection with no request for this long is closed (nginx's default).
IDLE_TIMEOUT = 75.0
#: Longest request line; longer gets 414. Not equal to MAX_HEADER_FIELD: the parser reports
#: both as "line too long" with its limit, and the limit tells which line it was.
MAX_REQUEST_LINE = 8192
#: Longest header line (name and value); longer gets 431. Big cookies fit.
MAX_HEADER_FIELD = 8190
#: Most header lines in a request; more gets 431.
MAX_HEADERS = 128
#: Most bytes of a whole request head; more gets 431 (browsers send a few kilobytes).
MAX_REQUEST_HEAD = 64 << 10
#: Agents upgraded but not through HELLO at once; more get 503 before the upgrade. Real agents
#: finish HELLO in one round trip, so only a flood (or a bridge restart's reconnect wave on a
#: huge fleet) gets near it.
MAX_PENDING_HANDSHAKES = 64
#: Of those, most from one source address (an IPv6 /64 counts as one) and most with one
#: credential (token or key): a real agent holds one for a round trip, a home rarely has more
#: than a few agents, and one holder can no longer keep every other home out.
MAX_PENDING_HANDSHAKES_PER_SOURCE = 8
MAX_PENDING_HANDSHAKES_PER_CREDENTIAL = 8
#: Requests in flight, and WebSockets open, at once from one visitor address (an IPv6 /64
#: counts as one) to one tunnel; more get 429. A household behind one address never gets near
#: (a browser keeps about 6 connections per site, a Home Assistant tab one WebSocket), while
#: one script can no longer take every stream slot of a tunnel.
MAX_REQUESTS_PER_VISITOR = 256
MAX_WEBSOCKETS_PER_VISITOR = 256
#: Retry-After for a visitor who found the tunnel at its stream limit: streams end quickly.
BUSY_RETRY_AFTER = 1
#: Time the agent waits for a TCP connection to the home app before answering 502.
TARGET_CONNECT_TIMEOUT = 10.0

#: A tunnel WebSocket message packs frames up to about this size; bigger messages would delay
#: small frames of other streams behind them, smaller ones cost more syscalls per byte.
MAX_TUNNEL_MESSAGE = 1 << 20
#: The tunnel WebSocket's receive limit: a full message plus one maximal frame over it.
TUNNEL_MESSAGE_LIMIT = 4 << 20
#: Frames of one tunnel message processed before the event loop gets a turn (other tunnels,
#: visitors, health checks): a few hundred microseconds of work at most.
FRAMES_PER_TURN = 256
#: Cheap frames (PING, PONG, WINDOW, empty or tiny DATA, refused OPENs) a tunnel peer may send
#: per second before it is cut off with GOAWAY EXCESSIVE_LOAD. A real peer sends a handful,
#: plus one WINDOW per 256 KiB consumed (4,000 a second at 1 GB/s); a flood of empty frames,
#: which flow control does not slow, sends 100,000s.
CHEAP_FRAME_RATE = 20_000
#: Queued output above this makes stream writers wait for the socket (backpressure).
WRITE_HIGH_WATER = 1 << 20

#: Largest WebSocket message relayed from the home app (Home Assistant's state dumps can be
#: megabytes).
MAX_WEBSOCKET_MESSAGE = 16 << 20
#: Largest WebSocket message a visitor may send (the bridge's max_websocket_message): what a
#: browser sends a home app is commands and small documents; aiohttp assembles a message
#: whole before it can be relayed, so this bounds what each visitor socket can make the
#: bridge, and then the agent, hold. Over it the visitor's socket is closed with 1009.
VISITOR_WEBSOCKET_MESSAGE = 1 << 20
#: Seconds a visitor WebSocket may be silent before the bridge pings it; one that does not
#: answer within half that again is closed (a dead phone, a forgotten tab, an attacker
#: holding stream slots).
WEBSOCKET_IDLE_TIMEOUT = 120.0
#: WebSocket messages a visitor may send per second before its socket is closed with 1008:
#: far above what a dashboard or a terminal needs (the benchmark's echo loop does ~8,000),
#: below the 55,000 tiny frames a second that froze the bridge (issue 15, finding 5); the
#: relays yield to the loop every 64 messages whatever the rate.
WEBSOCKET_MESSAGE_RATE = 20_000

#: Reconnect backoff of the agent: doubles from 1 s, capped near 60 s, with full jitter.
BACKOFF_INITIAL = 1.0
BACKOFF_MAX = 60.0
#: A connection that lived this long resets the backoff to its initial value.
BACKOFF_RESET_AFTER = 30.0

#: Services one agent may offer besides its main web app (each is announced in its HELLO).
MAX_SERVICES = 64
#: Largest chunk read from a TCP service or client at once: one DATA frame or channel message.
TCP_READ_SIZE = 64 << 10

#: Default tunnel name for an agent started without --name.
DEFAULT_TUNNEL_NAME = "home"
#: Where ``rproxy bridge`` and an embedded Bridge listen by default: every interface.
DEFAULT_BRIDGE_HOST = "0.0.0.0"
DEFAULT_BRIDGE_PORT = 8080
