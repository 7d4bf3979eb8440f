"""Agent credentials: the tokens an agent may present, and the tunnel names each may serve."""

from __future__ import annotations

import hmac
from collections.abc import Iterable
from pathlib import Path

from ..config import TokenGrant
from ..exceptions import ConfigError
from ..headers import is_tunnel_name

__all__ = ["TokenAuth", "TokenGrant", "read_token_file"]


class TokenAuth:
    """The accepted agent tokens, compared in constant time."""

    def __init__(self, tokens: Iterable[str | TokenGrant]) -> None:
        grants = [t if isinstance(t, TokenGrant) else TokenGrant(t) for t in tokens]
        self._grants = [(grant.token.encode(), grant) for grant in grants if grant.token]

    def __bool__(self) -> bool:
        return bool(self._grants)

    def __len__(self) -> int:
        return len(self._grants)

    def match(self, presented: str | None) -> TokenGrant | None:
        """The grant whose token is ``presented`` (every token is compared: no timing hint)."""
        if not presented:
            return None
        candidate = presented.encode()
        found: TokenGrant | None = None
        for token, grant in self._grants:
            if hmac.compare_digest(candidate, token) and found is None:
                found = grant
        return found

    def check(self, presented: str | None) -> bool:
        """Whether ``presented`` is one of the tokens."""
        return self.match(presented) is not None

    def allows(self, presented: str, name: str) -> bool:
        """Whether ``presented`` is accepted and may serve tunnel ``name``."""
        grant = self.match(presented)
        return grant is not None and grant.allows(name)


def read_token_file(path: str | Path) -> list[TokenGrant]:
    """Tokens from a file: one per line, optionally followed by the tunnel names it may serve.

    ``TOKEN`` alone may serve any name; ``TOKEN garage shed`` only ``garage`` and ``shed``.
    Blank lines and ``#`` comments are skipped.

    Raises:
        ConfigError: the file cannot be read, or a line names an invalid tunnel (the message
            names the file and line, never the token).
    """
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as err:
        raise ConfigError(f"{path}: cannot read: {err.strerror or err}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not UTF-8 text") from None
    grants: list[TokenGrant] = []
    for number, line in enumerate(text.splitlines(), 1):
        fields = line.split()
        if not fields or fields[0].startswith("#"):
            continue
        token, names = fields[0], fields[1:]
        for name in names:
            if not is_tunnel_name(name):
                raise ConfigError(f"{path}: line {number}: expected a DNS label (a-z, 0-9, -), got {name!r}")
        grants.append(TokenGrant(token, frozenset(names) if names else None))
    return grants
