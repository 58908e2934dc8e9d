#!/usr/bin/env bash
# Installs the Debian packages whose real servers the tests and the demo start: Prometheus.
# Idempotent; does nothing when everything is present.
set -euo pipefail
need=()
command -v prometheus >/dev/null 2>&1 || need+=(prometheus)
[ ${#need[@]} -eq 0 ] && exit 0
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  if command -v sudo >/dev/null 2>&1; then SUDO="sudo -n"; else
    echo "error: missing Debian packages: ${need[*]}; install them as root (apt-get install ${need[*]})" >&2
    exit 1
  fi
fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
# The package starts a system-wide Prometheus on :9090 where systemd runs; tests start their
# own on free ports, so stop it if it came up.
$SUDO systemctl disable --now prometheus >/dev/null 2>&1 || true
$SUDO pkill -x prometheus >/dev/null 2>&1 || true
echo "installed: ${need[*]}"
