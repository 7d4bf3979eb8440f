"""Agent credentials: the tokens an agent may present, and the tunnel names each may serve.

An accepted token may be written as ``sha256:HEX``, the SHA-256 of the token, so that the
bridge's config and token file hold nothing an agent could log in with. A plain, unsalted
SHA-256 is enough because agent tokens are long random strings (``rproxy hash-token --new``
makes 256-bit ones): there is no dictionary to try, so a slow password hash would only add
cost to every agent connection for no gain.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
from collections.abc import Iterable, Iterator
from pathlib import Path

from ..config import TOKEN_HASH_PREFIX, TokenGrant, check_token_entry
from ..exceptions import ConfigError
from ..headers import is_tunnel_name

__all__ = ["TokenAuth", "TokenGrant", "basic_credential", "hash_token", "read_token_file", "token_digest"]


def hash_token(token: str) -> str:
    """The ``sha256:HEX`` line that stands for ``token`` in a token file or config."""
    return TOKEN_HASH_PREFIX + hashlib.sha256(token.encode()).hexdigest()


def basic_credential(encoded: str) -> str | None:
    """The ``user:password`` of an ``Authorization: Basic`` value (after the scheme), or None
    when it is not strict base64 of UTF-8 text with a colon.

    An agent started as node-rproxy's is (``ws://user:pass@bridge``) sends its credential
    so; the bridge then matches ``user:password`` as it matches a token (``rproxy bridge
    PORT USER:PASS`` accepts it as one). The header's size is bounded by the HTTP parser.
    """
    try:
        text = base64.b64decode(encoded.strip(), validate=True).decode("utf-8")
    except (binascii.Error, ValueError):  # UnicodeDecodeError is a ValueError
        return None
    return text if ":" in text and text.isprintable() else None


def token_digest(entry: str) -> bytes:
    """The SHA-256 an accepted-token entry stands for: written out if hashed, computed if clear.

    Raises:
        ValueError: a malformed ``sha256:`` entry.
    """
    entry = check_token_entry(entry)
    if entry.startswith(TOKEN_HASH_PREFIX):
        return bytes.fromhex(entry[len(TOKEN_HASH_PREFIX) :])
    return hashlib.sha256(entry.encode()).digest()


class TokenAuth:
    """The accepted agent tokens, compared in constant time.

    Every entry, clear or hashed, is kept as a SHA-256 digest and a presented token is hashed
    once: each comparison is then between two 32-byte digests, so neither a token's length nor
    whether its entry was hashed shows in the time an answer takes.
    """

    def __init__(self, tokens: Iterable[str | TokenGrant]) -> None:
        grants = [t if isinstance(t, TokenGrant) else TokenGrant(t) for t in tokens]
        self._grants: list[tuple[bytes, TokenGrant]] = []
        for number, grant in enumerate(grants, 1):
            if not grant.token:
                continue
            try:
                self._grants.append((token_digest(grant.token), grant))
            except ValueError as err:
                raise ConfigError(f"token {number}: {err}") from None

    def __bool__(self) -> bool:
        return bool(self._grants)

    def __len__(self) -> int:
        return len(self._grants)

    def match(self, presented: str | None) -> TokenGrant | None:
        """The grant whose token is ``presented`` (every token is compared: no timing hint)."""
        if not presented:
            return None
        # surrogateescape: a header that was not UTF-8 is a wrong token, not an exception.
        candidate = hashlib.sha256(presented.encode("utf-8", "surrogateescape")).digest()
        found: TokenGrant | None = None
        for digest, grant in self._grants:
            if hmac.compare_digest(candidate, digest) and found is None:
                found = grant
        return found

    def check(self, presented: str | None) -> bool:
        """Whether ``presented`` is one of the tokens."""
        return self.match(presented) is not None

    def allows(self, presented: str, name: str) -> bool:
        """Whether ``presented`` is accepted and may serve tunnel ``name``."""
        grant = self.match(presented)
        return grant is not None and grant.allows(name)


def credential_lines(path: str | Path) -> Iterator[tuple[int, list[str]]]:
    """The non-blank, non-comment lines of a credentials file, as (line number, fields).

    Raises:
        ConfigError: the file cannot be read or is not UTF-8 (the message names it).
    """
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as err:
        raise ConfigError(f"{path}: cannot read: {err.strerror or err}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not UTF-8 text") from None
    for number, line in enumerate(text.splitlines(), 1):
        fields = line.split()
        if fields and not fields[0].startswith("#"):
            yield number, fields


def read_token_file(path: str | Path) -> list[TokenGrant]:
    """Tokens from a file: one per line, optionally followed by the tunnel names it may serve.

    ``TOKEN`` alone may serve any name; ``TOKEN garage shed`` only ``garage`` and ``shed``.
    TOKEN may be written as its hash, ``sha256:HEX`` (``rproxy hash-token`` prints such lines).
    Blank lines and ``#`` comments are skipped.

    Raises:
        ConfigError: the file cannot be read, or a line names an invalid tunnel or holds a
            malformed hash (the message names the file and line, never the token).
    """
    grants: list[TokenGrant] = []
    for number, fields in credential_lines(path):
        token, names = fields[0], fields[1:]
        try:
            token = check_token_entry(token)
        except ValueError as err:
            raise ConfigError(f"{path}: line {number}: {err}") from None
        for name in names:
            if not is_tunnel_name(name):
                raise ConfigError(f"{path}: line {number}: expected a DNS label (a-z, 0-9, -), got {name!r}")
        grants.append(TokenGrant(token, frozenset(names) if names else None))
    return grants
