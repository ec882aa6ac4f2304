#!/bin/sh
# Extract promtool from Debian's `prometheus` package into .venv/promtool/ (no install, no
# service started) and print its path. Idempotent: a second run only prints the path.
#
#   tests/tools/install_promtool.sh            # -> /path/to/repo/.venv/promtool/usr/bin/promtool
#   PROMTOOL_DIR=/somewhere tests/tools/install_promtool.sh
set -eu

repo=$(cd "$(dirname "$0")/../.." && pwd)
dest=${PROMTOOL_DIR:-"$repo/.venv/promtool"}
bin="$dest/usr/bin/promtool"

if [ -x "$bin" ] && "$bin" --version >/dev/null 2>&1; then
    echo "$bin"
    exit 0
fi

command -v apt-get >/dev/null 2>&1 || { echo "install_promtool: apt-get not found (Debian/Ubuntu only)" >&2; exit 1; }
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT INT TERM
cd "$work"
if ! apt-get download prometheus >/dev/null 2>&1; then
    # The package lists may be missing (fresh container): refresh them once and retry.
    if [ "$(id -u)" = 0 ]; then apt-get update >/dev/null 2>&1 || true; else sudo -n apt-get update >/dev/null 2>&1 || true; fi
    apt-get download prometheus >/dev/null || { echo "install_promtool: apt-get download prometheus failed" >&2; exit 1; }
fi
deb=$(ls prometheus_*.deb | head -n 1)
rm -rf "$dest.tmp"
mkdir -p "$dest.tmp"
dpkg -x "$deb" "$dest.tmp"
[ -x "$dest.tmp/usr/bin/promtool" ] || { echo "install_promtool: no usr/bin/promtool in $deb" >&2; exit 1; }
rm -rf "$dest"
mv "$dest.tmp" "$dest"
"$bin" --version >/dev/null
echo "$bin"
