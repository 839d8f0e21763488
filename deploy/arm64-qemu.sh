#!/usr/bin/env bash
# deploy/arm64-qemu.sh — Proof on ARM: a Raspberry Pi OS-like userland (Debian bookworm
# arm64) under qemu user-mode emulation on an x86_64 Debian host, with wattmesh
# installed from a wheel and every dependency from a PyPI aarch64 wheel; then the
# proof that an aarch64 peer joins a market session with x86_64 peers.
#
# Usage (as root, from anywhere):   deploy/arm64-qemu.sh [ROOTFS]
#   ROOTFS   the arm64 root file system, default /srv/wattmesh-arm64 (never inside the repo)
#   env PROOF=0        build and install only, skip tests/benchmarks/arm_proof.py
#   env PYTHON=...     host Python with wattmesh importable (pip install -e .), default python3
#   env MIRROR=...     Debian mirror, default http://deb.debian.org/debian
#
# What it does, in order; every step is skipped when already done, so it is safe to re-run:
#  1. host: apt-get install qemu-user-static binfmt-support debootstrap, and mosquitto for
#     the proof (each only if missing).
#  2. host: mount binfmt_misc on /proc/sys/fs/binfmt_misc if it is not mounted (a container
#     may start without it) and `update-binfmts --enable qemu-aarch64`; checks the entry
#     /proc/sys/fs/binfmt_misc/qemu-aarch64 says "enabled". Building the rootfs needs it
#     (dpkg runs aarch64 programs that run others); without it the script stops.
#  3. debootstrap --arch=arm64 --variant=minbase bookworm ROOTFS with python3 (3.11),
#     python3-venv and ca-certificates; a stamp file ROOTFS/etc/wattmesh-rootfs-complete
#     marks a finished one (a half-built ROOTFS without it is removed and rebuilt).
#     Copies /usr/bin/qemu-aarch64-static into ROOTFS/usr/bin, so `chroot ROOTFS
#     /usr/bin/qemu-aarch64-static PROGRAM` also runs a single aarch64 program without binfmt.
#  4. mounts proc and binds /dev into ROOTFS, copies /etc/resolv.conf and the host's local
#     CAs (/usr/local/share/ca-certificates, e.g. of a TLS-inspecting proxy) so pip reaches
#     PyPI from inside, and unmounts them again on exit.
#  5. builds the wattmesh wheel on the host from the repository's working tree (tracked
#     and untracked, not ignored, files, copied to a temporary directory so the repo gets
#     no build/ directory): `pip wheel --no-deps`, into ROOTFS/opt/wattmesh/dist.
#  6. inside ROOTFS (emulated): `python3 -m venv /opt/wattmesh/venv`, then
#     `pip install --only-binary=:all: WHEEL` (dependencies from PyPI, wheels only: no
#     source build can sneak in) and `pip install --no-deps --force-reinstall WHEEL`
#     (the current code, same version number).
#  7. writes ROOTFS/opt/wattmesh/wheels.txt: every installed distribution with its
#     version and wheel tag (from its .dist-info/WHEEL) — the proof that every
#     dependency has an aarch64 (or pure-Python) wheel — and prints it.
#  8. unless PROOF=0: nice -n 10 $PYTHON tests/benchmarks/arm_proof.py --rootfs ROOTFS
#     (Mosquitto on a free loopback port, one peer in ROOTFS, the others native; exit
#     status 0 when the session converged with the aarch64 peer's signed report).
set -euo pipefail

ROOTFS=$(realpath -m "${1:-/srv/wattmesh-arm64}")
REPO=$(cd "$(dirname "$0")/.." && pwd)
PYTHON=${PYTHON:-python3}
MIRROR=${MIRROR:-http://deb.debian.org/debian}
PROOF=${PROOF:-1}
SUITE=bookworm
STAMP="$ROOTFS/etc/wattmesh-rootfs-complete"
VENV=/opt/wattmesh/venv
BINFMT=/proc/sys/fs/binfmt_misc

say() { printf '\n== %s\n' "$*"; }
die() { printf 'arm64-qemu.sh: %s\n' "$*" >&2; exit 1; }

[ "$(id -u)" = 0 ] || die "run as root (debootstrap, chroot, mount)"
case "$ROOTFS/" in "$REPO"/*) die "ROOTFS $ROOTFS is inside the repository $REPO; put it elsewhere" ;; esac
[ "$ROOTFS" != / ] || die "ROOTFS must not be /"

say "1. host packages"
missing=()
host_packages=(qemu-user-static binfmt-support debootstrap)
[ "$PROOF" = 0 ] || host_packages+=(mosquitto) # the proof's broker, run natively
for pkg in "${host_packages[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'install ok installed' || missing+=("$pkg")
done
if [ ${#missing[@]} -gt 0 ]; then
    apt-get update
    DEBIAN_FRONTEND=noninteractive apt-get install -y "${missing[@]}"
fi
dpkg-query -W -f='${Package} ${Version}\n' "${host_packages[@]}"

say "2. binfmt_misc registration of qemu-aarch64"
if [ ! -e "$BINFMT/register" ]; then
    mount -t binfmt_misc binfmt_misc "$BINFMT" || true
fi
update-binfmts --enable qemu-aarch64 || true
if [ "$(head -n1 "$BINFMT/qemu-aarch64" 2>/dev/null)" = enabled ]; then
    sed 's/^/   /' "$BINFMT/qemu-aarch64"
else
    die "binfmt_misc entry qemu-aarch64 is not enabled ($BINFMT not writable?): the rootfs cannot be built here.
A rootfs built elsewhere still runs one program with: chroot ROOTFS /usr/bin/qemu-aarch64-static PROGRAM
(tests/benchmarks/arm_proof.py --runner explicit)"
fi

# --- mounts for the emulated steps, always undone on exit
MOUNTED=()
cleanup() {
    local i
    for ((i = ${#MOUNTED[@]} - 1; i >= 0; i--)); do umount "${MOUNTED[i]}" 2>/dev/null || umount -l "${MOUNTED[i]}" || true; done
    [ -z "${SRC:-}" ] || rm -rf "$SRC"
}
trap cleanup EXIT
mounts_under() { findmnt -rn -o TARGET | grep -E "^$ROOTFS(/|$)" || true; }

say "3. Debian $SUITE arm64 rootfs at $ROOTFS"
if [ -d "$ROOTFS" ] && [ ! -e "$STAMP" ]; then
    [ -z "$(mounts_under)" ] || die "half-built $ROOTFS has mounts under it: $(mounts_under | tr '\n' ' ')"
    echo "   removing a half-built $ROOTFS (no $STAMP)"
    rm -rf --one-file-system "$ROOTFS"
fi
if [ ! -e "$STAMP" ]; then
    mkdir -p "$(dirname "$ROOTFS")"
    nice -n 10 debootstrap --arch=arm64 --variant=minbase \
        --include=python3,python3-venv,ca-certificates "$SUITE" "$ROOTFS" "$MIRROR"
    date -u +%FT%TZ >"$STAMP"
else
    echo "   already built ($(cat "$STAMP"))"
fi
install -m 0755 /usr/bin/qemu-aarch64-static "$ROOTFS/usr/bin/qemu-aarch64-static"
cp -L /etc/resolv.conf "$ROOTFS/etc/resolv.conf" 2>/dev/null || true
# Local CAs the host trusts (e.g. a TLS-inspecting egress proxy) are trusted inside too,
# else pip cannot reach PyPI from the rootfs; a host without any copies nothing.
LOCAL_CAS=(/usr/local/share/ca-certificates/*.crt)
if [ -e "${LOCAL_CAS[0]}" ]; then
    mkdir -p "$ROOTFS/usr/local/share/ca-certificates"
    cp "${LOCAL_CAS[@]}" "$ROOTFS/usr/local/share/ca-certificates/"
fi

say "4. mounts for the emulated steps"
if ! mountpoint -q "$ROOTFS/proc"; then mount -t proc proc "$ROOTFS/proc"; MOUNTED+=("$ROOTFS/proc"); fi
if ! mountpoint -q "$ROOTFS/dev"; then mount --bind /dev "$ROOTFS/dev"; MOUNTED+=("$ROOTFS/dev"); fi
in_rootfs() { chroot "$ROOTFS" /usr/bin/env -i PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME=/root LANG=C.UTF-8 "$@"; }
echo "   uname -m inside: $(in_rootfs uname -m); $(in_rootfs python3 --version)"
# shellcheck disable=SC2016 # dpkg-query's own ${Status} format, not a shell expansion
if ! in_rootfs dpkg-query -W -f='${Status}' python3-venv 2>/dev/null | grep -q 'install ok installed'; then
    in_rootfs apt-get update
    in_rootfs env DEBIAN_FRONTEND=noninteractive apt-get install -y python3 python3-venv ca-certificates
fi
in_rootfs update-ca-certificates >/dev/null

say "5. wattmesh wheel, built on the host from $REPO"
SRC=$(mktemp -d)
(cd "$REPO" && git ls-files -z --cached --others --exclude-standard |
    tar --null --ignore-failed-read -T - -cf - 2>/dev/null) | tar -C "$SRC" -xf -
echo "   source: $(git -C "$REPO" rev-parse --short HEAD)$(git -C "$REPO" diff --quiet HEAD || echo ' + uncommitted changes')"
mkdir -p "$ROOTFS/opt/wattmesh/dist"
rm -f "$ROOTFS"/opt/wattmesh/dist/wattmesh-*.whl
nice -n 10 "$PYTHON" -m pip wheel --quiet --no-deps --wheel-dir "$ROOTFS/opt/wattmesh/dist" "$SRC"
WHEEL=$(cd "$ROOTFS/opt/wattmesh/dist" && ls wattmesh-*.whl)
echo "   $WHEEL"

say "6. venv $VENV inside the rootfs, dependencies as PyPI wheels only (emulated: takes minutes)"
[ -x "$ROOTFS$VENV/bin/python" ] || in_rootfs python3 -m venv "$VENV"
PIP=("$VENV/bin/pip" install --disable-pip-version-check --cert /etc/ssl/certs/ca-certificates.crt)
in_rootfs nice -n 10 "${PIP[@]}" --only-binary=:all: \
    "/opt/wattmesh/dist/$WHEEL"
in_rootfs nice -n 10 "${PIP[@]}" --no-deps --force-reinstall \
    "/opt/wattmesh/dist/$WHEEL"
in_rootfs "$VENV/bin/pip" check

say "7. installed distributions and their wheel tags (ROOTFS/opt/wattmesh/wheels.txt)"
SITE=$(echo "$ROOTFS$VENV"/lib/python3*/site-packages)
{
    echo "# $(date -u +%FT%TZ) $VENV in Debian $(cat "$ROOTFS/etc/debian_version") arm64, $(in_rootfs python3 --version)"
    for info in "$SITE"/*.dist-info; do
        name_version=$(basename "$info" .dist-info)
        tags=$(sed -n 's/^Tag: //p' "$info/WHEEL" 2>/dev/null | paste -sd' ' -)
        origin=PyPI
        case "$name_version" in
            pip-* | setuptools-*) origin="python3-venv (ensurepip)" ;;
            wattmesh-*) origin="built from $REPO" ;;
        esac
        printf '%-32s %-60s %s\n' "${name_version/-/ }" "$tags" "$origin"
    done
} >"$ROOTFS/opt/wattmesh/wheels.txt"
cat "$ROOTFS/opt/wattmesh/wheels.txt"
echo "   venv size: $(du -sh "$ROOTFS$VENV" | cut -f1)"

# the proof's emulated peer needs none of these mounts
cleanup
MOUNTED=()
SRC=

if [ "$PROOF" != 0 ]; then
    say "8. proof: an aarch64 peer in a session with x86_64 peers"
    cd "$REPO"
    nice -n 10 "$PYTHON" tests/benchmarks/arm_proof.py --rootfs "$ROOTFS"
fi
