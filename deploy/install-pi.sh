#!/bin/sh
# Install a wattmesh home peer on 64-bit Raspberry Pi OS (Debian bookworm, aarch64) or
# any Debian-like system with systemd. Run as root:
#
#     sudo sh install-pi.sh [WHEEL_OR_SPEC]      # default spec: wattmesh
#
# What it does, idempotently:
#   1. apt-get installs python3-venv (the only system package needed: every Python
#      dependency has manylinux aarch64 wheels, nothing is compiled on the Pi);
#   2. creates the system user "wattmesh" and the virtualenv /opt/wattmesh;
#   3. installs wattmesh into it (--only-binary: fail rather than compile);
#   4. creates /etc/wattmesh (root:wattmesh, 0750) with the example config if none is there;
#   5. installs and enables the systemd unit wattmesh-peer.service (not started until
#      /etc/wattmesh/peer.toml, the key and the roster are in place: see docs/deploy.md).
set -eu
SPEC="${1:-wattmesh}"
HERE="$(cd "$(dirname "$0")" && pwd)"

apt-get update -q
apt-get install -y -q python3-venv

id wattmesh >/dev/null 2>&1 || useradd --system --home-dir /var/lib/wattmesh --shell /usr/sbin/nologin wattmesh
[ -x /opt/wattmesh/bin/python ] || python3 -m venv /opt/wattmesh
/opt/wattmesh/bin/pip install --quiet --upgrade pip
/opt/wattmesh/bin/pip install --quiet --only-binary=:all: "$SPEC"

install -d -o root -g wattmesh -m 0750 /etc/wattmesh
[ -e /etc/wattmesh/peer.toml ] || install -o root -g wattmesh -m 0640 "$HERE/peer.example.toml" /etc/wattmesh/peer.toml
install -o root -g root -m 0644 "$HERE/wattmesh-peer.service" /etc/systemd/system/wattmesh-peer.service
systemctl daemon-reload
systemctl enable wattmesh-peer.service

echo "installed: /opt/wattmesh/bin/wattmesh ($(/opt/wattmesh/bin/wattmesh --help >/dev/null && echo ok))"
echo "next: put this home's key, the roster and peer.toml in /etc/wattmesh, then"
echo "      sudo -u wattmesh /opt/wattmesh/bin/wattmesh peer /etc/wattmesh/peer.toml --check"
echo "      sudo systemctl start wattmesh-peer && journalctl -u wattmesh-peer -f"
