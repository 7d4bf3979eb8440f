"""Bridge URL rules: which URLs name a bridge, where its agent endpoint is, what counts as this machine."""

from __future__ import annotations

import ipaddress

from yarl import URL

from ..const import CONNECT_PATH
from ..exceptions import ConfigError

__all__ = ["bridge_connect_url", "is_cleartext_remote", "is_loopback_host", "split_bridge_credential"]


def bridge_connect_url(bridge: str) -> str:
    """The WebSocket URL of a bridge's agent endpoint.

    Accepts ``ws://``, ``wss://``, ``http://`` and ``https://`` base URLs (the seed system's
    ``REMOTE_URL`` is an http URL).

    Raises:
        ConfigError: the URL is not one of those, or has no host.
    """
    schemes = {"ws": "ws", "wss": "wss", "http": "ws", "https": "wss"}
    try:
        url = URL(bridge.strip())
        valid = url.scheme in schemes and bool(url.host)
    except (ValueError, TypeError):  # yarl refuses e.g. a port out of range or a broken IPv6 host
        valid = False
    if not valid:
        raise ConfigError(f"--bridge {bridge!r}: expected ws://, wss://, http:// or https:// with a host")
    if url.user is not None or url.password is not None:
        # Not echoed: the user:password part is a secret. The CLI and the integration take it
        # off first (split_bridge_credential) and send it as the agent's credential.
        raise ConfigError("--bridge: the URL must not carry user:password@ here (give it as the token, sent as Basic)")
    base = url.with_scheme(schemes[url.scheme]).with_query(None).with_fragment(None)
    path = base.path.rstrip("/")
    if not path.endswith(CONNECT_PATH):
        path += CONNECT_PATH
    return str(base.with_path(path))


def split_bridge_credential(bridge: str) -> tuple[str, str | None]:
    """``ws://user:pass@host:8080`` → (``ws://host:8080``, ``"user:pass"``); without userinfo
    the URL as given and None.

    The credential is what a bridge started as ``rproxy bridge PORT USER:PASS`` accepts; the
    agent sends it as ``Authorization: Basic`` (``AgentConfig.basic_auth``).

    Raises:
        ConfigError: userinfo without both a user and a password, or a ``:`` in the user
            (HTTP Basic could not carry it). The message never repeats the URL.
    """
    try:
        url = URL(bridge.strip())
        user, password = url.user, url.password
    except (ValueError, TypeError):
        if "@" in bridge:  # not echoed: what comes before the @ may be a password
            raise ConfigError("--bridge: not a valid URL (not shown: it may hold a password)") from None
        return bridge, None
    if user is None and password is None:
        return bridge, None
    if not user or password is None or ":" in user:
        raise ConfigError("--bridge: user:password@ in the URL needs a user (without ':') and a password")
    return str(url.with_user(None)), f"{user}:{password}"


def is_loopback_host(host: str) -> bool:
    """127.0.0.0/8, ::1 (also as ::ffff:127.x) or ``localhost``.

    Other names are not resolved: what a name points at can change after this check, so only
    the one name every resolver keeps on the machine counts.
    """
    if host.lower().rstrip(".") == "localhost":
        return True
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped.is_loopback
    return address.is_loopback


def is_cleartext_remote(bridge: str) -> bool:
    """Whether the tunnel to ``bridge`` would leave this machine unencrypted (``ws://``/``http://``
    to a host that is not loopback; a LAN address counts as remote: the LAN is a network too).

    Raises:
        ConfigError: ``bridge`` is not a bridge URL.
    """
    url = URL(bridge_connect_url(bridge))
    return url.scheme == "ws" and not is_loopback_host(url.host or "")
