#!/usr/bin/env bash
# Install hpcimage (the product alone) into PREFIX, e.g. /apps/hpcimage on a shared
# file system, as root (docs/install.md):
#
#   bash scripts/install.sh [OPTIONS] [PREFIX]          # default PREFIX: /opt/hpcimage
#
#   PREFIX/venvs/hpcimage-VERSION-TIME/   one virtualenv per installed version (from
#                                         /usr/bin/python3), hpcimage and hpcimage-join in it
#   PREFIX/venv -> venvs/hpcimage-...     the current one; wrappers use PREFIX/venv/bin/python3
#   PREFIX/bin/hpcimage -> ../venv/bin/hpcimage
#
# Safe on a live system: a new version is installed into a new directory beside the old
# one and PREFIX/venv is switched to it in one rename; nothing a running job uses is
# overwritten or removed (the 3 newest old versions are kept). When the checkout's
# package sources (hpcimage/*.py, *.c, templates/) are what PREFIX/venv holds already,
# nothing is done. It also installs the Debian packages a compute node needs (only the
# missing ones: no network when they are all there).
#
#   --no-packages     leave the system's packages alone (install the venv only)
#   --packages-only   only this node's packages (run it on every compute node)
#   --extras LIST     the package's extras too (e.g. test: pytest, hypothesis)
#   --optional LIST   more pip packages, installed when possible (e.g. mpi4py)
#
# Environment: HPCIMAGE_BASE_PYTHON (default /usr/bin/python3); pip's own variables
# (PIP_INDEX_URL, PIP_FIND_LINKS, PIP_NO_INDEX) for a site without PyPI.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
prog=install.sh
packages=1 venv_too=1 extras="" optional=""
usage() {  # usage [WHAT]: one line, exit 2
    echo "$prog: error: ${1:+$1; }usage: $prog [--no-packages|--packages-only] [--extras LIST] [--optional LIST] [PREFIX]" >&2
    exit 2
}
prefix=""
while [ $# -gt 0 ]; do
    case $1 in
        --no-packages) packages=0 ;;
        --packages-only) venv_too=0 ;;
        --extras) [ $# -ge 2 ] || usage "--extras needs a value"; extras=$2; shift ;;
        --optional) [ $# -ge 2 ] || usage "--optional needs a value"; optional=$2; shift ;;
        -h|--help) sed -n '2,27p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        -*) usage "unknown option $1" ;;
        *) [ -z "$prefix" ] || usage "one PREFIX only"; prefix=$1 ;;
    esac
    shift
done
prefix=${prefix:-/opt/hpcimage}
case $prefix in /*) ;; *) echo "$prog: error: PREFIX must be an absolute path: $prefix" >&2; exit 2 ;; esac
prefix=${prefix%/}
base_python=${HPCIMAGE_BASE_PYTHON:-/usr/bin/python3}

if [ "$(id -u)" != 0 ] && [ "$packages" = 1 ]; then
    echo "$prog: error: run as root to install packages (or --no-packages)" >&2
    exit 2
fi

# ---------------------------------------------------------------- this node's packages
# What a compute node needs to start containers (squashfuse_ll, /dev/fuse, newuidmap),
# writable layers (fuse-overlayfs, fuse2fs, mkfs.ext3), encrypted images (gocryptfs),
# signatures and keys (gpgv; gpg for `hpcimage key`), and what building the venv and the joiner needs
# (python3-venv, a C compiler).
if [ "$packages" = 1 ]; then
    pkgs=(python3 python3-venv squashfuse fuse3 uidmap gcc libc6-dev squashfs-tools
          fuse-overlayfs fuse2fs e2fsprogs gocryptfs gpgv gnupg)
    if command -v dpkg-query >/dev/null 2>&1; then
        missing=()
        for p in "${pkgs[@]}"; do
            dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p")
        done
        if [ ${#missing[@]} -gt 0 ]; then
            echo "$prog: installing ${missing[*]}"
            export DEBIAN_FRONTEND=noninteractive
            apt-get update -q
            apt-get install -y -q --no-install-recommends "${missing[@]}"
        fi
    else
        echo "$prog: warning: not a Debian system: install squashfuse, fuse3, shadow-utils" \
             "(newuidmap), python3 and gcc with the system's package manager (docs/install.md)" >&2
    fi
    mkdir -p /var/lib/hpcimage/mnt    # the runtime's session directory (private per container)
fi
[ "$venv_too" = 1 ] || exit 0

# ---------------------------------------------------------------- the virtualenv
# The digest of the package sources in a checkout or in an installed venv: the same
# files (the package's *.py and *.c, the templates), the same order, as
# tests/conftest.py compares them.
digest() {  # digest PYTHON PACKAGE_DIR TEMPLATES_DIR
    "$1" -I - "$2" "$3" <<'EOF'
import hashlib, sys
from pathlib import Path
h = hashlib.sha256()
for root, globs in ((sys.argv[1], ("*.py", "*.c")), (sys.argv[2], ("*.j2",))):
    root = Path(root)
    if not root.is_dir():
        print("none")
        raise SystemExit
    for p in sorted(q for g in globs for q in root.rglob(g)):
        if "__pycache__" in p.parts:
            continue
        h.update(str(p.relative_to(root)).encode())
        h.update(p.read_bytes())
print(h.hexdigest())
EOF
}
mkdir -p "$prefix/venvs" "$prefix/bin"
chmod a+rx "$prefix" "$prefix/venvs" "$prefix/bin"    # whatever the umask: users run it
exec 9>"$prefix/.hpcimage-install.lock"                 # one install.sh at a time here
flock 9
want="$(digest "$base_python" "$here/hpcimage" "$here/templates") extras=$extras optional=$optional"
current=$prefix/venv
have=none
if [ -L "$current" ] && [ -x "$current/bin/python3" ]; then
    pkgdir=$("$current/bin/python3" -I -c 'import hpcimage, os; print(os.path.dirname(hpcimage.__file__))' 2>/dev/null || true)
    if [ -n "$pkgdir" ] && [ -f "$current/.hpcimage-install" ]; then
        have="$(digest "$current/bin/python3" "$pkgdir" "$current/share/hpcimage/templates") $(sed -n 's/^options: //p' "$current/.hpcimage-install")"
    fi
fi
if [ "$have" = "$want" ]; then
    echo "$prog: hpcimage in $current is this checkout's already: nothing to do"
    exit 0
fi

# The version: hpcimage/__init__.py's __version__ (setup.cfg reads it from there too).
version=$("$base_python" -I -c 'import ast, sys
for node in ast.parse(open(sys.argv[1]).read()).body:
    if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", "") == "__version__":
        print(node.value.value)' "$here/hpcimage/__init__.py")
case $version in ''|*[!0-9A-Za-z.+-]*) echo "$prog: error: no usable __version__ in hpcimage/__init__.py: '$version'" >&2; exit 1 ;; esac
new=$prefix/venvs/hpcimage-$version-$(date -u +%Y%m%dT%H%M%S)-$$
trap 'rm -rf "$new"' EXIT          # a failed install leaves nothing (PREFIX/venv unchanged)
echo "$prog: installing hpcimage $version into $new"
"$base_python" -m venv "$new"
"$new/bin/python3" -m pip install -q --upgrade pip setuptools wheel >/dev/null
spec=$here
[ -z "$extras" ] || spec="$here[$extras]"
# --no-build-isolation: setuptools and wheel from the venv (no download of a build env)
"$new/bin/python3" -m pip install -q --no-build-isolation "$spec"
for p in $optional; do
    "$new/bin/python3" -m pip install -q "$p" 2>/dev/null \
        || echo "$prog: warning: optional package $p not installed" >&2
done
# setuptools' distutils-precedence.pth runs at every start of the interpreter (it imports
# _distutils_hack: ~0.4 ms of every image-exec and MPI rank); nothing in this venv needs
# it at run time, and a build that imports setuptools loads the hack itself.
rm -f "$new"/lib/python*/site-packages/distutils-precedence.pth
if ! why=$("$new/bin/python3" -I -c 'import hpcimage.runtime.main, hpcimage.cli' 2>&1); then
    echo "$prog: error: the new venv cannot import hpcimage ($(printf '%s\n' "$why" | tail -n 1)): $current left as it was" >&2
    exit 1
fi
printf 'hpcimage %s installed %s from %s\noptions: extras=%s optional=%s\n' \
    "$version" "$(date -u +%Y-%m-%dT%H:%M:%SZ)" "$here" "$extras" "$optional" > "$new/.hpcimage-install"
chmod -R a+rX "$new"

# The switch: PREFIX/venv becomes a symbolic link to the new venv in one rename. A venv
# of the old layout (a real directory) is exchanged with the link (renameat2
# RENAME_EXCHANGE: never a moment without PREFIX/venv) and kept under venvs/.
"$base_python" -I - "$prefix" "$(basename "$new")" <<'EOF'
import ctypes, os, sys, time
prefix, name = sys.argv[1], sys.argv[2]
venv = os.path.join(prefix, "venv")
tmp = os.path.join(prefix, f".venv.hpcimage-tmp.{os.getpid()}")
os.symlink(os.path.join("venvs", name), tmp)
if os.path.isdir(venv) and not os.path.islink(venv):
    keep = os.path.join(prefix, "venvs", "hpcimage-before-" + time.strftime("%Y%m%dT%H%M%S", time.gmtime()))
    renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    AT_FDCWD, RENAME_EXCHANGE = -100, 2
    if renameat2 and renameat2(AT_FDCWD, tmp.encode(), AT_FDCWD, venv.encode(),
                               RENAME_EXCHANGE) == 0:
        os.rename(tmp, keep)          # tmp is the old directory now
    else:                             # no RENAME_EXCHANGE here (e.g. NFS): two renames
        why = os.strerror(ctypes.get_errno()) if renameat2 else "no renameat2"
        sys.stderr.write(f"install.sh: warning: cannot exchange atomically ({why}): "
                         f"{venv} is missing for a moment\n")
        os.rename(venv, keep)
        os.rename(tmp, venv)
    print(f"install.sh: the previous venv (a directory) is kept as {keep}")
else:
    os.replace(tmp, venv)
EOF
trap - EXIT
ln -sfn ../venv/bin/hpcimage "$prefix/bin/hpcimage"

# Old versions: the 3 newest stay (a running job may hold their files), older ones go.
cur=$(readlink "$prefix/venv")
ls -1dt "$prefix"/venvs/hpcimage-* 2>/dev/null | while read -r d; do
    [ "venvs/$(basename "$d")" = "$cur" ] && continue
    echo "$d"
done | tail -n +4 | while read -r d; do rm -rf "$d"; done
echo "$prog: hpcimage $version in $prefix/venv -> $cur"
