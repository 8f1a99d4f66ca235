#!/usr/bin/env bash
# The main job on the default site.yaml (README command 1, after setup.sh), as root:
#   1. build the site's images that this machine can build from their definition files
#      in images/ (`hpcimage build`): Demo/1.0 offline from busybox-static, Debian/12
#      with debootstrap when a mirror answers, into the store;
#   2. check the committed modulefiles/ and wrappers/ are current, and install the
#      rendering for users under /opt/hpcimage/site;
#   3. as the unprivileged user: module load Demo/1.0; image-exec cat /etc/os-release.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
venv=${HPCIMAGE_VENV:-/opt/hpcimage/venv}
prefix=${HPCIMAGE_PREFIX:-/opt/hpcimage/site}
user=${HPCIMAGE_TEST_USER:-hpcuser}
hpcimage=$venv/bin/hpcimage
py=$venv/bin/python3
store=$("$py" -c 'import sys, yaml, os; d = yaml.safe_load(open(sys.argv[1])); s = d["store"]; print(s if os.path.isabs(s) else os.path.join(os.path.dirname(os.path.abspath(sys.argv[1])), s))' "$here/site.yaml")
mkdir -p "$store"
chmod 755 "$store"

build() {  # build OUT DEF: hpcimage build writes OUT atomically (nothing on failure)
    if [ ! -f "$1" ] || [ "${HPCIMAGE_REBUILD:-0}" = 1 ]; then
        echo "demo: building $(basename "$1") from ${2#$here/}"
        "$hpcimage" build --force "$1" "$2" && chmod 644 "$1"
    fi
}

build "$store/Demo-1.0.sqfs" "$here/images/Demo.def"
if ! build "$store/Debian-12.sqfs" "$here/images/Debian-12.def"; then
    echo "demo: warning: Debian/12 not built (no Debian mirror reachable?); Demo/1.0 still works" >&2
fi

cd "$here"
"$hpcimage" generate --site site.yaml --check >/dev/null \
    || echo "demo: warning: the committed modulefiles/ and wrappers/ are stale: run 'hpcimage generate'" >&2
"$hpcimage" generate --site site.yaml --prefix "$prefix"
chmod -R a+rX "$prefix"
echo "demo: modules installed under $prefix (module use $prefix/modulefiles)"

echo "demo: as $user: module load Demo/1.0; image-exec cat /etc/os-release"
cd /
runuser -u "$user" -- bash -lc "
    module use $prefix/modulefiles
    module load Demo/1.0
    module list 2>&1
    image-exec cat /etc/os-release
    image-run echo 'image-run: the runscript ran'
"
