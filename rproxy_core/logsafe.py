"""Peer-supplied text made safe for a log line.

Anything a peer chose (a visitor's path or header, an agent's id or GOAWAY reason, a bridge's
public URL) may hold newlines, terminal escape sequences or bidirectional overrides: logged
as it is, it could forge a line of its own or rewrite what an operator's terminal shows.
``printable`` escapes every such character (as ``\\n``, ``\\x1b``, ``\\u202e``) and bounds the
length, so one event stays one line of visible text.
"""

from __future__ import annotations

import re

__all__ = ["printable"]

#: C0 and C1 controls, DEL, Unicode line/paragraph separators, bidi embeddings/overrides and
#: isolates, lone surrogates (from undecodable bytes) and the backslash itself, so that an
#: escape in the output always came from here.
_UNSAFE = re.compile("[\\\\\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069\ud800-\udfff]")

_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t", "\\": "\\\\"}


def _escape(match: re.Match[str]) -> str:
    char = match.group()
    named = _NAMED.get(char)
    if named is not None:
        return named
    code = ord(char)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def printable(text: object, limit: int = 256) -> str:
    """``text`` as one line of visible text, at most ``limit`` characters of it (then "…")."""
    value = text if isinstance(text, str) else str(text)
    if len(value) > limit:
        value = value[:limit] + "…"
    if _UNSAFE.search(value) is None:  # the common case: nothing to copy
        return value
    return _UNSAFE.sub(_escape, value)
