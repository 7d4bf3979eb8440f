# Shared by scripts/demo and scripts/test: make sure .venv exists with the pinned packages.
# Installs Debian's python3-venv when the interpreter cannot make a virtualenv.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VENV="$ROOT/.venv"

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

apt_install() {
  # Installs the named Debian packages that are missing (one apt-get update per run).
  local missing=()
  for pkg in "$@"; do dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg"); done
  [ ${#missing[@]} -eq 0 ] && return 0
  command -v apt-get >/dev/null || { echo "rproxy: please install: ${missing[*]}" >&2; exit 1; }
  echo "installing Debian packages: ${missing[*]}"
  if [ -z "${_RPROXY_APT_UPDATED:-}" ]; then as_root apt-get update -qq; _RPROXY_APT_UPDATED=1; fi
  DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

pick_python() {
  # The first Python >= 3.11 found: $RPROXY_PYTHON, then python3, then versioned names.
  local candidate
  for candidate in ${RPROXY_PYTHON:-} python3 python3.13 python3.12 python3.11; do
    if command -v "$candidate" >/dev/null 2>&1 &&
       "$candidate" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
      command -v "$candidate"; return 0
    fi
  done
  apt_install python3 python3-venv
  command -v python3
}

ensure_venv() {
  # $1: the requirements file to install (pinned). Re-installs only when it or pyproject changes.
  local requirements="$1" stamp python
  stamp=$(cat "$requirements" "$ROOT/pyproject.toml" | sha256sum | cut -c1-16)
  if [ -x "$VENV/bin/python" ] && [ "$(cat "$VENV/.rproxy-stamp" 2>/dev/null)" = "$stamp" ]; then
    return 0
  fi
  python=$(pick_python)
  if [ ! -x "$VENV/bin/python" ]; then
    if ! "$python" -m venv "$VENV" 2>/dev/null; then
      rm -rf "$VENV"
      apt_install python3-venv
      "$python" -m venv "$VENV"
    fi
  fi
  echo "installing Python packages into .venv (log: .venv/install.log)"
  if ! { "$VENV/bin/python" -m pip install --disable-pip-version-check --upgrade pip &&
         "$VENV/bin/python" -m pip install --disable-pip-version-check -r "$requirements" -e "$ROOT"; } \
       > "$VENV/install.log" 2>&1; then
    tail -n 30 "$VENV/install.log" >&2
    echo "rproxy: installing Python packages failed; the whole log is in .venv/install.log" >&2
    exit 1
  fi
  "$VENV/bin/python" -c 'import rproxy_core' # fail here, loudly, if the install did not work
  echo "$stamp" > "$VENV/.rproxy-stamp"
}
