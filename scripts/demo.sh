#!/usr/bin/env bash
# The main job on the default site.yaml (README command 1, after setup.sh), as root:
#   1. build the site's images that this machine can build from their definition files
#      in images/ (`hpcimage build`): Demo/1.0 offline from busybox-static, Debian/12
#      with debootstrap when a mirror answers, into the store;
#   2. check the committed modulefiles/ and wrappers/ are current, and render the
#      default site for users into the demo's own prefix, /opt/hpcimage/demo (never
#      a site's prefix: a re-run must not touch the modules an admin rendered there;
#      and generate removes only files it rendered itself);
#   3. as the unprivileged user: module load Demo/1.0; image-exec cat /etc/os-release.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
venv=${HPCIMAGE_VENV:-/opt/hpcimage/venv}
prefix=${HPCIMAGE_DEMO_PREFIX:-/opt/hpcimage/demo}
user=${HPCIMAGE_TEST_USER:-hpcuser}
hpcimage=$venv/bin/hpcimage
py=$venv/bin/python3
store=$("$py" -c 'import sys, yaml, os; d = yaml.safe_load(open(sys.argv[1])); s = d["store"]; print(s if os.path.isabs(s) else os.path.join(os.path.dirname(os.path.abspath(sys.argv[1])), s))' "$here/site.yaml")
mkdir -p "$store"
chmod 755 "$store"

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

ours=$("$hpcimage" version)
built_by() {  # the hpcimage version an image was built by (its label), or nothing
    "$hpcimage" inspect --json "$1" 2>/dev/null | "$py" -c 'import json, sys
labels = json.load(sys.stdin)["data"]["attributes"].get("labels") or {}
print(labels.get("org.label-schema.usage.hpcimage.version", ""))' 2>/dev/null || true
}

image() {  # image NAME VERSION DEF FILE: build from DEF, then publish; an image in the
           # store built by this hpcimage is kept (HPCIMAGE_REBUILD=1 builds it anyway)
    local name=$1 version=$2 def=$3 file=$4 src=$store/$4 why=
    if [ ! -f "$src" ]; then why="not in the store"
    elif [ "${HPCIMAGE_REBUILD:-0}" = 1 ]; then why="HPCIMAGE_REBUILD=1"
    elif [ "$(built_by "$src")" != "$ours" ]; then why="built by another hpcimage than $ours"
    fi
    if [ -n "$why" ]; then
        echo "demo: building $name/$version from ${def#$here/} ($why)"
        "$hpcimage" build "$work/$file" "$def" || return 1
        src=$work/$file
    fi
    # Into the store with the manifest (a no-op when it is recorded there already).
    "$hpcimage" publish "$src" --name "$name" --version "$version" \
        --site "$here/site.yaml" --definition "$def" >/dev/null
}

image Demo 1.0 "$here/images/Demo.def" Demo-1.0.sqfs
if ! image Debian 12 "$here/images/Debian-12.def" Debian-12.sqfs; then
    echo "demo: warning: Debian/12 not built (no Debian mirror reachable?); Demo/1.0 still works" >&2
fi
chmod -R a+rX "$store"

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
    image-update && image-update --check && echo 'image-update: the local copy is current'
"
