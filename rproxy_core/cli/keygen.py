"""``rproxy keygen``: make the Ed25519 key an agent proves itself with, instead of a token.

The private key stays on the agent's machine (mode 0600, never overwritten: losing a key to
a typo would lock its tunnel out). Standard output gets only the public line for the
bridge's authorized-keys file, so ``rproxy keygen --name garage >> authorized_keys`` works
when run where that file lives; the fingerprint and derived name go to standard error.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from ..exceptions import ConfigError
from ..headers import is_tunnel_name
from ..identity import derived_name, encode_public_key, fingerprint, load_private_key
from .common import EXIT_OK

__all__ = ["DEFAULT_KEY_FILE", "add_parser", "load_private_key", "main"]

DEFAULT_KEY_FILE = "~/.config/rproxy/agent.key"


def add_parser(commands: Any) -> None:
    command = commands.add_parser(
        "keygen",
        help="make an Ed25519 key for an agent (rproxy agent --key) and print its authorized-keys line",
        description="Write a new Ed25519 private key (PEM, mode 0600; an existing file is never overwritten) "
        "and print the line for the bridge's --authorized-keys file: ed25519 KEY NAME... On standard "
        "error: the key's fingerprint and the tunnel name an --open-registration bridge gives it.",
    )
    command.add_argument(
        "--out",
        metavar="FILE",
        default=DEFAULT_KEY_FILE,
        help=f"where to write the private key (default {DEFAULT_KEY_FILE})",
    )
    command.add_argument(
        "--name",
        dest="names",
        action="append",
        metavar="NAME",
        default=[],
        help="a tunnel name the key may claim, written on the line (repeatable)",
    )


def main(args: argparse.Namespace) -> int:
    for name in args.names:
        if name != "*" and not is_tunnel_name(name):
            raise ConfigError(f"--name: expected a DNS label (a-z, 0-9, -) or *, got {name!r}")
    path = Path(args.out).expanduser()
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    try:
        # O_EXCL: refuses an existing file, and the mode applies from the first byte written.
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise ConfigError(f"--out {args.out}: exists; not overwritten (move it away or pick another file)") from None
    with os.fdopen(fd, "wb") as file:
        file.write(pem)
    raw = key.public_key().public_bytes_raw()
    print(" ".join(["ed25519", encode_public_key(key.public_key()), *args.names]), flush=True)
    print(
        f"private key written to {path}\nfingerprint: {fingerprint(raw)}\n"
        f"tunnel name on an --open-registration bridge: {derived_name(raw)}",
        file=sys.stderr,
        flush=True,
    )
    return EXIT_OK
