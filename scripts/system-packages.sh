#!/usr/bin/env bash
# Install the Debian packages that the tests start as real servers or drive (scripts/apt-packages.txt),
# once: a package already installed costs one dpkg query. Needs root (CI and the dev machines are root).
set -euo pipefail
cd "$(dirname "$0")/.."
missing=()
while read -r pkg _; do
    [[ -z "$pkg" || "$pkg" == \#* ]] && continue
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done < scripts/apt-packages.txt
if ((${#missing[@]})); then
    if [ "$(id -u)" != 0 ]; then
        echo "scripts/system-packages.sh: need root to apt-get install ${missing[*]}" >&2
        exit 1
    fi
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
