"""Peer-supplied text on its way into a log line.

Whatever a visitor, an agent or a bridge wrote (a path, a header value, a GOAWAY reason, an
agent id, a public URL) can hold a newline that forges a second log line, or an ESC sequence
that repaints the operator's terminal. Every such value goes through :func:`escaped` before it
is logged: control characters (C0, DEL, C1, and the Unicode line and paragraph separators)
become ``\\xNN`` / ``\\uNNNN``, a backslash becomes ``\\\\`` (so an escape cannot be faked), and
overlong text is cut. Printable text, including non-ASCII letters, stays as it is.
"""

from __future__ import annotations

__all__ = ["escaped"]


def _table() -> dict[int, str]:
    table = {code: f"\\x{code:02x}" for code in (*range(0x20), *range(0x7F, 0xA0))}
    table[ord("\\")] = "\\\\"
    for code in (0x2028, 0x2029, 0xFEFF, 0x200E, 0x200F, *range(0x202A, 0x202F), *range(0x2066, 0x206A)):
        # Line separators and bidirectional overrides: a log line that displays differently
        # from what it says.
        table[code] = f"\\u{code:04x}"
    for code in range(0xDC80, 0xDD00):
        # Bytes that were not UTF-8, as aiohttp and os.fsdecode hand them on (surrogateescape).
        table[code] = f"\\x{code - 0xDC00:02x}"
    return table


_TABLE = _table()

#: Longer peer text is cut: a log line stays a line, whatever the peer sent.
DEFAULT_LIMIT = 512


def escaped(text: object, limit: int = DEFAULT_LIMIT) -> str:
    """``text`` (str() of it) safe for one log line: control characters escaped, at most about ``limit`` characters."""
    value = text if isinstance(text, str) else str(text)
    if len(value) > limit:
        value = value[:limit].translate(_TABLE) + f"...(+{len(value) - limit} chars)"
        return value
    return value.translate(_TABLE)
