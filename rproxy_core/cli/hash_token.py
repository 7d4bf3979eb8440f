"""``rproxy hash-token``: the line a bridge's token file holds instead of an agent's clear token.

The token never comes from the command line, where shell history and ``ps`` would keep it:
it is read from standard input (without echo on a terminal), or made up with ``--new``.
Standard output gets only the hash line, so ``rproxy hash-token --new >> tokens`` appends it
to the token file while the new token itself is shown once, on standard error.
"""

from __future__ import annotations

import argparse
import getpass
import secrets
import sys
from typing import Any, TextIO

from ..bridge.auth import hash_token
from ..config import TOKEN_HASH_PREFIX
from ..exceptions import ConfigError
from ..headers import is_tunnel_name
from .common import EXIT_OK

__all__ = ["MIN_TOKEN_LENGTH", "add_parser", "main", "new_token"]

#: Below this, a token's hash may be reversed by trying likely tokens; said, not refused.
MIN_TOKEN_LENGTH = 20
#: Bytes of randomness in a ``--new`` token (256 bits, 43 characters of URL-safe base64).
_NEW_TOKEN_BYTES = 32


def new_token() -> str:
    """A random agent token (256 bits, URL-safe base64) that does not start with ``-``.

    One in 64 would otherwise, and ``--token -Xy...`` reads as a flag on every command line.
    """
    while True:
        token = secrets.token_urlsafe(_NEW_TOKEN_BYTES)
        if not token.startswith("-"):
            return token


def add_parser(commands: Any) -> None:
    command = commands.add_parser(
        "hash-token",
        help="print the sha256: line that stands for an agent token in the bridge's token file",
        description="Read an agent token from standard input (not echoed on a terminal), or make a new one "
        "with --new, and print the line for the bridge's token file or tokens: list: sha256:HEX, then the "
        "tunnel names. The bridge accepts the token and stores nothing an agent could log in with.",
    )
    command.add_argument(
        "--new",
        action="store_true",
        help="make a new random token: shown once on standard error, its hash on standard output",
    )
    command.add_argument(
        "--name",
        dest="names",
        action="append",
        metavar="NAME",
        default=[],
        help="a tunnel name the token may serve (repeatable; default: any)",
    )


def _read_token(stdin: TextIO) -> str:
    # On a terminal, not echoed: a token typed in would otherwise stay in the scrollback.
    interactive = stdin.isatty()
    token = (
        getpass.getpass("agent token (not echoed): ", stream=sys.stderr) if interactive else stdin.readline()
    ).strip()
    if not token:
        raise ConfigError("no token on standard input (or use --new to make one)")
    if not token.isprintable() or any(c.isspace() for c in token):
        raise ConfigError("the token must be one word of printable characters (agents send no other)")
    if token.lower().startswith(TOKEN_HASH_PREFIX):  # the bridge would read the hash of a hash as a hash
        raise ConfigError("this is already a token's hash; give the token itself")
    return token


def main(args: argparse.Namespace, stdin: TextIO | None = None) -> int:
    for name in args.names:
        if not is_tunnel_name(name):
            raise ConfigError(f"--name: expected a DNS label (a-z, 0-9, -), got {name!r}")
    if args.new:
        token = new_token()
    else:
        token = _read_token(stdin or sys.stdin)
        if len(token) < MIN_TOKEN_LENGTH:
            print(
                f"rproxy hash-token: warning: a token shorter than {MIN_TOKEN_LENGTH} characters can be found "
                "from its hash by guessing; rproxy hash-token --new makes a strong one",
                file=sys.stderr,
            )
    print(" ".join([hash_token(token), *args.names]), flush=True)
    if args.new:
        print(f"new agent token (give it to the agent; it is shown only now): {token}", file=sys.stderr, flush=True)
    return EXIT_OK
