"""The bare bridge's agent token: ``rproxy bridge`` with no credential configured makes one.

NAT Web Reverse Proxy's server has "no configuration at all"; rproxy's bridge still never
serves agents without a credential. So on its first start a bridge given none generates a
strong token and keeps it in a state directory, and later starts reuse it:

1. ``$RPROXY_STATE_DIRECTORY``,
2. ``$STATE_DIRECTORY`` (systemd's ``StateDirectory=``; the first of several),
3. ``$XDG_STATE_HOME/rproxy``, by default ``~/.local/state/rproxy``.

The file is ``agent-token``, mode 0600 in a directory made 0700: whoever can read it can
serve a tunnel on this bridge.
"""

from __future__ import annotations

import os
import secrets
import socket
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from ..bridge.routing import is_loopback_host
from ..exceptions import ConfigError

__all__ = [
    "PLACEHOLDER_HOST",
    "STATE_TOKEN_FILE",
    "StateToken",
    "agent_command",
    "state_directory",
    "state_path",
    "state_token",
]

STATE_TOKEN_FILE = "agent-token"
#: 256 random bits, as hex: no character a shell or argparse reads specially.
_TOKEN_BYTES = 32


def state_directory(environ: Mapping[str, str]) -> Path:
    """Where the bare bridge keeps its token (see the module's docstring).

    Raises:
        ConfigError: none of the variables is set and there is no home directory.
    """
    if environ.get("RPROXY_STATE_DIRECTORY"):
        return Path(environ["RPROXY_STATE_DIRECTORY"])
    if environ.get("STATE_DIRECTORY"):
        return Path(environ["STATE_DIRECTORY"].split(":")[0])
    if environ.get("XDG_STATE_HOME"):
        return Path(environ["XDG_STATE_HOME"]) / "rproxy"
    home = environ.get("HOME")
    if not home:
        raise ConfigError(
            "--token: no agent token given and no state directory for one: set $RPROXY_STATE_DIRECTORY "
            "(or give --token / --token-file)"
        )
    return Path(home) / ".local" / "state" / "rproxy"


@dataclass(frozen=True, slots=True)
class StateToken:
    """The bare bridge's token, where it is kept, and whether this start made it."""

    token: str
    path: Path
    created: bool

    def __repr__(self) -> str:  # never the secret itself
        return f"StateToken(path={str(self.path)!r}, created={self.created})"


def _read(path: Path) -> str | None:
    """The token in ``path``, None if there is no file.

    Raises:
        ConfigError: the file cannot be read or holds no token (never repeated: it is a secret).
    """
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as err:
        reason = getattr(err, "strerror", None) or "not UTF-8 text"
        raise ConfigError(f"{path}: cannot read the bridge's agent token: {reason}") from None
    token = text.strip()
    if not token or not token.isprintable() or len(token.split()) != 1:
        raise ConfigError(f"{path}: expected one agent token on one line; delete the file to get a new one")
    return token


def state_path(environ: Mapping[str, str]) -> Path:
    """The file the bare bridge's token is kept in."""
    return state_directory(environ) / STATE_TOKEN_FILE


def state_token(environ: Mapping[str, str], *, create: bool = True) -> StateToken | None:
    """The kept token, made (and written, mode 0600) if there is none and ``create``.

    Returns None when there is none and ``create`` is false (``--check-config``).

    Raises:
        ConfigError: the directory or file cannot be made or read (named in the message).
    """
    path = state_path(environ)
    token = _read(path)
    if token is not None:
        return StateToken(token, path, created=False)
    if not create:
        return None
    token = secrets.token_hex(_TOKEN_BYTES)
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        # O_EXCL: two bridges starting at once must not each write a token of their own.
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        kept = _read(path)
        if kept is None:
            raise ConfigError(f"{path}: appeared and vanished while this bridge started; start it again") from None
        return StateToken(kept, path, created=False)
    except OSError as err:
        raise ConfigError(
            f"{path}: cannot keep the bridge's agent token there: {err.strerror or err} "
            "(set $RPROXY_STATE_DIRECTORY, or give --token / --token-file)"
        ) from None
    with os.fdopen(fd, "w", encoding="utf-8") as file:
        file.write(token + "\n")
        file.flush()
        os.fsync(file.fileno())
    return StateToken(token, path, created=True)


#: In the printed command when this machine knows no name of its own but localhost.
PLACEHOLDER_HOST = "THIS-SERVER"


def _advertised_host(host: str) -> str:
    """The host name to put in the agent's bridge URL: the listen address, or this machine's
    own name when the bridge listens on every address (a placeholder if it knows none)."""
    if host not in ("", "0.0.0.0", "::"):
        return f"[{host}]" if ":" in host else host
    for name in (socket.getfqdn(), socket.gethostname()):
        if name and not is_loopback_host(name.lower()) and name.lower() != "localhost.localdomain":
            return name
    return PLACEHOLDER_HOST


def agent_command(host: str, port: int, token: str, *, tls: bool) -> tuple[str, bool]:
    """The ``rproxy agent`` command that reaches this bridge with ``token``, and whether it
    needs ``--insecure`` (a bridge without TLS that listens beyond loopback: the agent is at
    home, on another machine)."""
    insecure = not tls and not is_loopback_host(host.strip("[]") or "0.0.0.0")
    url = f"{'wss' if tls else 'ws'}://{_advertised_host(host)}:{port}"
    return f"rproxy agent {url} http://127.0.0.1:8080 --token {token}" + (" --insecure" if insecure else ""), insecure
