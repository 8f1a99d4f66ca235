#!/usr/bin/env bash
# Set up a *test machine* for hpcimage (Debian 12, as root): the product itself
# (scripts/install.sh: the compute node's packages and the versioned venv behind
# /opt/hpcimage/venv), then what only the tests, the demo and the benchmarks need:
# Lmod, Environment Modules, busybox-static and debootstrap for test images, a local
# registry, the benchmark's peers, the test user and a usable /dev/fuse.
# A site's install is scripts/install.sh alone (docs/install.md).
#
# Safe to re-run, on a live system too: install.sh does nothing when the venv holds
# this checkout's package already, and otherwise installs a new venv beside the old
# one and switches /opt/hpcimage/venv to it in one rename (never a reinstall into
# the venv that running jobs use).
#
#   bash scripts/setup.sh
#   HPCIMAGE_PREFIX=/other/prefix bash scripts/setup.sh      # venv: PREFIX/venv
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
prefix=${HPCIMAGE_PREFIX:-/opt/hpcimage}
venv=$prefix/venv
test_user=${HPCIMAGE_TEST_USER:-hpcuser}

if [ "$(id -u)" != 0 ]; then
    echo "setup.sh: run as root (it installs Debian packages)" >&2
    exit 2
fi

# Debian packages. Lmod and Debian's environment-modules conflict as packages, so
# Environment Modules is unpacked from Debian's own .deb into /opt/hpcimage/envmodules
# (used by the tests to load the Tcl modulefiles with the real modulecmd.tcl).
# (install.sh adds the compute node's own: squashfuse, fuse3, uidmap, python3-venv, gcc.)
pkgs=(lmod lua5.3 tcl squashfuse squashfs-tools fuse3 fuse2fs busybox-static debootstrap
      charliecloud-runtime python3 python3-venv python3-dev gcc libc6-dev make rsync passwd
      util-linux procps uidmap docker-registry gnupg fuse-overlayfs gocryptfs)
missing=()
for p in "${pkgs[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q
    apt-get install -y -q --no-install-recommends "${missing[@]}"
fi
em=/opt/hpcimage/envmodules
if [ ! -x "$em/usr/lib/x86_64-linux-gnu/modulecmd.tcl" ] && [ ! -f "$em/.unpacked" ]; then
    tmp=$(mktemp -d)
    (cd "$tmp" && apt-get download environment-modules >/dev/null 2>&1) || {
        apt-get update -q && (cd "$tmp" && apt-get download environment-modules); }
    chmod -R a+rX "$tmp"
    mkdir -p "$em"
    dpkg-deb -x "$tmp"/environment-modules_*.deb "$em"
    touch "$em/.unpacked"
    rm -rf "$tmp"
fi

# A cluster has /dev/fuse world-usable (0666); some build machines ship it 0600.
if [ -c /dev/fuse ]; then chmod 0666 /dev/fuse; fi

# hpcimage itself, with the test extras, into a versioned venv behind $venv (a new
# one only when this checkout's package differs from what $venv holds).
bash "$here/scripts/install.sh" --extras test --optional mpi4py "$prefix"
mkdir -p /var/lib/hpcimage/mnt   # where the runtime mounts its session (private to each container)
ln -sf "$venv/bin/hpcimage" /usr/local/bin/hpcimage

# The unprivileged user the tests and the demo run containers as.
if ! id "$test_user" >/dev/null 2>&1; then
    useradd --create-home --shell /bin/bash "$test_user"
fi
# Subordinate ids for unprivileged builds (hpcimage build maps them with newuidmap);
# useradd adds them where /etc/subuid exists, an older user may lack them.
touch /etc/subuid /etc/subgid
grep -q "^$test_user:" /etc/subuid || usermod --add-subuids 100000-165535 "$test_user"
grep -q "^$test_user:" /etc/subgid || usermod --add-subgids 100000-165535 "$test_user"
echo "setup.sh: hpcimage $("$venv/bin/python3" -c 'import hpcimage; print(hpcimage.__version__)') in $venv"
