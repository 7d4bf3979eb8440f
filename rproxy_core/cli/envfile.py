"""``.env`` files for ``rproxy agent``: NAT Web Reverse Proxy's client is configured with
AGENT_ID, REMOTE_URL and LOCAL_URL "in a ``.env`` file", and so is rproxy's agent.

The file is read with python-dotenv (quotes, ``export``, comments, multi-line values as it
defines them). Its variables stand in for environment variables that are not set: a real
environment variable always wins, as with every dotenv tool. Nothing is interpolated (``$``
stays ``$``: a token may hold one).
"""

from __future__ import annotations

import io
from pathlib import Path

from dotenv import dotenv_values
from dotenv.parser import parse_stream

from ..exceptions import ConfigError

__all__ = ["DEFAULT_ENV_FILE", "read_env_file"]

#: Read from the working directory when it exists and no ``--env-file`` is given.
DEFAULT_ENV_FILE = ".env"

#: Far more than any settings file needs: a stray multi-gigabyte ``.env`` is not read.
_MAX_SIZE = 1 << 20


def read_env_file(path: str | None) -> dict[str, str]:
    """The variables of ``path`` (``--env-file``), or of ``./.env`` if it exists when None.

    Raises:
        ConfigError: the file given cannot be read, is not UTF-8 text, is too big, or has a
            line python-dotenv cannot parse (named by its number; its text is not repeated,
            it may hold a token).
    """
    explicit = path is not None
    name = path if path is not None else DEFAULT_ENV_FILE
    where = f"--env-file {name}" if explicit else name
    try:
        with Path(name).open("rb") as file:
            raw = file.read(_MAX_SIZE + 1)
    except FileNotFoundError:
        if explicit:
            raise ConfigError(f"{where}: no such file") from None
        return {}
    except OSError as err:
        raise ConfigError(f"{where}: cannot read: {err.strerror or err}") from None
    if len(raw) > _MAX_SIZE:
        raise ConfigError(f"{where}: larger than {_MAX_SIZE >> 20} MiB; not a settings file")
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise ConfigError(f"{where}: not UTF-8 text") from None
    for binding in parse_stream(io.StringIO(text)):
        if binding.error:
            # python-dotenv counts a statement from the blank lines before it: skip them.
            statement = binding.original.string
            line = binding.original.line + statement[: len(statement) - len(statement.lstrip())].count("\n")
            raise ConfigError(f"{where}: line {line}: not a NAME=VALUE line python-dotenv can read")
    values = dotenv_values(stream=io.StringIO(text), interpolate=False)
    # A bare ``NAME`` line has no value (None): it sets nothing.
    return {key: value for key, value in values.items() if value is not None}
