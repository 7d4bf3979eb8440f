"""The visitor side of raw TCP channels: ``rproxy tcp`` as a library."""

from __future__ import annotations

from .tcp import (
    ChannelAborted,
    ChannelRefused,
    TcpChannel,
    TcpClient,
    TcpClientConfig,
    channel_url,
)

__all__ = ["ChannelAborted", "ChannelRefused", "TcpChannel", "TcpClient", "TcpClientConfig", "channel_url"]
