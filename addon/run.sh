#!/usr/bin/env bash
# Start the rproxy agent with the options the Supervisor wrote. Everything about those options
# (meaning, validation, error messages) lives in rproxy itself; this script only hands the file
# over, so the same path runs in the container and in the tests without bashio or s6.
set -euo pipefail

options_file="${RPROXY_ADDON_OPTIONS:-/data/options.json}"

if [[ ! -f "$options_file" || ! -r "$options_file" ]]; then
    echo "rproxy add-on: error: cannot read the add-on options at ${options_file}" >&2
    exit 2
fi

# exec: rproxy takes this process's place, so the stop signal reaches it and not a shell.
exec rproxy agent --config "$options_file"
