"""A hostile agent's text reaches the bridge's log escaped (issue 15, finding 13).

The agent is our own small one (hostile_agent.py) speaking the tunnel protocol to a real bridge.
"""

from __future__ import annotations

import logging

import pytest

from tests.conftest import running_bridge
from tests.core.security.hostile_agent import GOAWAY, code_and_reason, frame, hostile_agent, until


async def test_a_goaway_reason_is_logged_escaped(caplog: pytest.LogCaptureFixture) -> None:
    forged = "bye\nrproxy.bridge WARNING: admin logged in\x1b[2J\x1b]0;owned\x07"
    async with running_bridge() as bridge, hostile_agent(bridge.url, lambda s, h: b"") as agent:
        with caplog.at_level(logging.INFO, "rproxy"):
            await agent.send(frame(GOAWAY, 0, code_and_reason(0, forged)))
            await until(lambda: not bridge.registry.tunnels())
            await until(lambda: any("goodbye" in r.getMessage() for r in caplog.records))
    messages = [r.getMessage() for r in caplog.records]
    assert any("admin logged in" in m for m in messages)
    for message in messages:
        assert "\n" not in message and "\x1b" not in message and "\x07" not in message, message
