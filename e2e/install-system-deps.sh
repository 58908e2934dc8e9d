#!/usr/bin/env bash
# Installs the Debian packages the tests and the demo need: Prometheus (a real server they
# start), libpython3.11 (tritonserver's Python backend stub links against
# libpython3.11.so.1.0, which the python3.11 package does not bring) and python3-venv (make
# venv). Idempotent; does nothing when everything is present.
set -euo pipefail
need=()
command -v prometheus >/dev/null 2>&1 || need+=(prometheus)
# The listing is read whole before grep sees it: piped into `grep -q`, which stops at the first
# match, ldconfig was sometimes still writing and died of SIGPIPE, and under pipefail that
# failure read as "libpython3.11 missing" (a needless apt-get, or a failed setup without root).
# ldconfig lives in /sbin, which a user's PATH may lack.
libs="$(PATH="$PATH:/usr/sbin:/sbin" ldconfig -p 2>/dev/null || true)"
grep -q 'libpython3\.11\.so\.1\.0' <<<"$libs" || need+=(libpython3.11)
python3 -c 'import ensurepip' >/dev/null 2>&1 || need+=(python3-venv)
[ ${#need[@]} -eq 0 ] && exit 0
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  if command -v sudo >/dev/null 2>&1; then SUDO="sudo -n"; else
    echo "error: missing Debian packages: ${need[*]}; install them as root (apt-get install ${need[*]})" >&2
    exit 1
  fi
fi
export DEBIAN_FRONTEND=noninteractive
if [ -n "$SUDO" ] && ! sudo -n true 2>/dev/null; then
  # sudo would ask for a password, which make cannot answer
  echo "error: missing Debian packages: ${need[*]}; install them first (sudo apt-get install ${need[*]}), then run make setup again" >&2
  exit 1
fi
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
# The package starts a system-wide Prometheus on :9090 (as its own user, prometheus) where
# systemd or its init script runs; tests start their own on free ports, so stop that one, and
# only that one, and only when this run installed it: a Prometheus that was there before
# (a developer's, another checkout's test run) stays up.
if [[ " ${need[*]} " == *" prometheus "* ]]; then
  $SUDO systemctl disable --now prometheus >/dev/null 2>&1 || true
  $SUDO pkill -x -U prometheus prometheus >/dev/null 2>&1 || true
fi
echo "installed: ${need[*]}"
