"""The relay tests again with aiohttp's client at the agent, as without ``httptools`` installed.

The agent's lean client (agent/homehttp.py) serves plain http:// targets when httptools is
there, which the test environment has; an install without the [speed] extra relays through
aiohttp instead, and must behave the same.
"""

from __future__ import annotations

import pytest
from test_http_errors import *  # noqa: F403
from test_http_relay import *  # noqa: F403


@pytest.fixture(autouse=True)
def _aiohttp_client_at_the_agent(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RPROXY_HOME_CLIENT", "aiohttp")
