"""Log redaction for the websockets client library: our credentials and visitors' bytes stay out of its debug log."""

from __future__ import annotations

import logging

__all__ = ["NoSecretsFilter"]


class NoSecretsFilter(logging.Filter):
    """Keeps the agent's token and visitors' traffic out of websockets' debug log.

    At DEBUG, websockets logs every handshake header (our Authorization among them) and a
    preview of every frame (visitors' request heads: cookies, credentials). Handshake lines
    stay, with the credential masked; frame dumps go.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        if record.msg in ("> %s", "< %s"):  # a frame
            return False
        if (
            record.msg == "> %s: %s"
            and isinstance(record.args, tuple)
            and str(record.args[0]).lower() == "authorization"
        ):
            record.args = (record.args[0], "[redacted]")
        return True
