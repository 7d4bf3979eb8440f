"""Agent credentials: the tokens an agent may present when it connects."""

from __future__ import annotations

import hmac
from collections.abc import Iterable
from pathlib import Path

from ..exceptions import ConfigError

__all__ = ["TokenAuth", "read_token_file"]


class TokenAuth:
    """A set of accepted agent tokens, compared in constant time."""

    def __init__(self, tokens: Iterable[str]) -> None:
        self._tokens = [t.encode() for t in tokens if t]

    def __bool__(self) -> bool:
        return bool(self._tokens)

    def check(self, presented: str | None) -> bool:
        """Whether ``presented`` is one of the tokens (no early exit, no timing hint)."""
        if not presented:
            return False
        candidate = presented.encode()
        matched = False
        for token in self._tokens:
            matched |= hmac.compare_digest(candidate, token)
        return matched


def read_token_file(path: str | Path) -> list[str]:
    """Tokens from a file: one per line; blank lines and ``#`` comments are skipped.

    Raises:
        ConfigError: the file cannot be read (the message names it).
    """
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as err:
        raise ConfigError(f"--token-file {path}: {err.strerror or err}") from None
    return [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
