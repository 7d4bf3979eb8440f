"""Checks of how a bridge is dialled, before anything is sent: no credential in clear text across a network."""

from __future__ import annotations

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from yarl import URL

from ..exceptions import ConfigError
from .tls import pinned_sha256
from .urls import bridge_connect_url, is_cleartext_remote

__all__ = ["check_bridge_access", "check_credential"]


def check_bridge_access(bridge: str, ca_file: str | None, pins: tuple[str, ...], insecure: bool, secret: str) -> None:
    """Check how a bridge is dialled: its URL, and that ``secret`` (what travels to it, for the
    message) is never sent in clear text across a network unless ``insecure`` says so.

    Raises:
        ConfigError: naming the first bad setting.
    """
    bridge_connect_url(bridge)
    if is_cleartext_remote(bridge) and not insecure:
        raise ConfigError(
            f"--bridge {bridge!r}: refusing plain ws:// (or http://) to a bridge that is not on this "
            f"machine: {secret} and all traffic would cross the network in clear text; use wss:// "
            "(or https://), or --insecure for a bridge on a network you trust"
        )
    if ca_file is not None or pins:
        if URL(bridge_connect_url(bridge)).scheme != "wss":
            what = "--ca-file" if ca_file is not None else "--pin-sha256"
            raise ConfigError(f"{what}: only means something for a wss:// or https:// bridge")
        if ca_file is not None and not ca_file.strip():
            raise ConfigError("--ca-file: expected a file name")
        pinned_sha256(pins)


def check_credential(token: str, key: Ed25519PrivateKey | None, missing: str) -> None:
    """Exactly one of a token and a key, and a token that fits in a header line.

    Raises:
        ConfigError: ``missing`` when there is neither; otherwise naming the problem (never the token).
    """
    if key is not None and token:
        raise ConfigError("--token and --key: give one of them, not both")
    if key is None and not token:
        raise ConfigError(missing)
    if token and (not token.isprintable() or token != token.strip()):
        raise ConfigError("--token: must be one line of printable characters without surrounding spaces")
