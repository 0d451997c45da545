#!/usr/bin/env bash
# Installs everything vballoon needs on a fresh Debian 12 machine: the Debian packages,
# a virtual environment in .venv and the package itself in editable mode.
# Quick when everything is already there (make only calls it when pyproject.toml changes).
set -euo pipefail
cd "$(dirname "$0")/.."

debs=(libcap-dev libseccomp2 busybox-static cpio patchelf uidmap)
missing=()
for d in "${debs[@]}"; do
    dpkg-query -W -f='${Status}' "$d" 2>/dev/null | grep -q "install ok installed" || missing+=("$d")
done
if [ ${#missing[@]} -gt 0 ]; then
    echo "setup: installing Debian packages: ${missing[*]}"
    if [ "$(id -u)" -ne 0 ]; then
        echo "setup: need root to install ${missing[*]} (or install them by hand)" >&2
        exit 1
    fi
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi

if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e '.[test,bench]'
