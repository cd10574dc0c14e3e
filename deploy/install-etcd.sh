#!/usr/bin/env bash
# Installs etcd (Debian's etcd-server package) when `etcd` is not on the
# PATH: the fleet tests (tests/fleet.rs) start their own etcd on loopback.
# Uses sudo when not root. Does nothing when etcd is already there.
set -euo pipefail
if command -v etcd >/dev/null 2>&1; then
  echo "etcd is installed: $(etcd --version | head -1)"
  exit 0
fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  SUDO="sudo"
fi
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq etcd-server
# The package starts a system etcd on the default ports; the tests use
# ports of their own, so it is not needed (and may not be running at all
# in a container without systemd).
$SUDO systemctl disable --now etcd >/dev/null 2>&1 || true
echo "installed: $(etcd --version | head -1)"
