"""The `busybox` bootstrap agent: a root tree from the host's busybox-static.

No download: /bin/busybox (Debian's busybox-static) is copied into ROOT/bin and every
applet becomes a hard link to it, as `busybox --install` and Docker's busybox image
do: one inode for ~270 names, which a disk creates ~50x faster than 270 symlinks
(0.6 ms per new inode on the project's VM disk; see BENCHMARKS.md, bench/build), and
the tree works wherever it is mounted.

    python -m hpcimage.imagebuild.busybox [--bare] [--demo NAME VERSION] ROOT
"""
import os
import shutil
import subprocess
import sys

from hpcimage.linux import procstate
from hpcimage.errors import HpcimageError

BUSYBOX_CANDIDATES = ("/bin/busybox", "/usr/bin/busybox")

DEMO_RUNSCRIPT = """#!/bin/sh
# Demo image runscript: say where we are, then run the arguments if any.
. /etc/os-release
echo "Hello from $PRETTY_NAME"
if [ $# -gt 0 ]; then exec "$@"; fi
"""

DEMO_ENV = """# Sourced by hpcimage and Apptainer before every command in the image.
export DEMO_IMAGE=1
export PATH="/opt/demo/bin:$PATH"
"""


def find_busybox():
    for p in BUSYBOX_CANDIDATES:
        if os.access(p, os.X_OK):
            return p
    raise HpcimageError("busybox not found: install busybox-static")


def populate(root, busybox=None):
    """Write bin/busybox and its applet links under root (which may exist)."""
    busybox = busybox or find_busybox()
    bindir = os.path.join(root, "bin")
    os.makedirs(bindir, exist_ok=True)
    target = os.path.join(bindir, "busybox")
    shutil.copy2(busybox, target)
    r = subprocess.run([busybox, "--list"], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                       stderr=subprocess.STDOUT, close_fds=False,
                       preexec_fn=procstate.for_exec)
    rc, out = r.returncode, r.stdout
    if rc != 0:
        raise HpcimageError(f"{busybox} --list failed (exit {rc}): "
                            f"{out.decode(errors='replace').strip()[-200:]}")
    applets = out.decode().split()
    for a in applets:
        if a != "busybox" and "/" not in a:
            try:
                os.link(target, os.path.join(bindir, a))
            except FileExistsError:
                pass
    return applets


def write(path, text, mode=0o644):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(text)
    os.chmod(path, mode)


def demo(root, name="Demo", version="1.0"):
    """The site's Demo image: busybox, /etc/os-release, /.singularity.d metadata."""
    import json
    populate(root)
    for d in ("etc", "home", "tmp", "proc", "sys", "dev", "root", "opt/demo/bin"):
        os.makedirs(os.path.join(root, d), exist_ok=True)
    os.chmod(os.path.join(root, "tmp"), 0o1777)
    write(os.path.join(root, "etc/os-release"),
          f'NAME="hpcimage {name}"\nVERSION="{version}"\nID=hpcimage-demo\n'
          f'PRETTY_NAME="hpcimage {name} {version} (busybox)"\n')
    write(os.path.join(root, "etc/passwd"), "root:x:0:0:root:/root:/bin/sh\n")
    write(os.path.join(root, "etc/group"), "root:x:0:\n")
    write(os.path.join(root, "opt/demo/bin/demo-hello"),
          '#!/bin/sh\necho "demo-hello: $*"\n', 0o755)
    sd = os.path.join(root, ".singularity.d")
    write(os.path.join(sd, "runscript"), DEMO_RUNSCRIPT, 0o755)
    write(os.path.join(sd, "env/90-environment.sh"), DEMO_ENV, 0o755)
    write(os.path.join(sd, "labels.json"),
          json.dumps({"org.label-schema.name": name, "org.label-schema.version": version,
                      "org.label-schema.build-agent": "hpcimage busybox"}, indent=2) + "\n")
    write(os.path.join(sd, "runscript.help"), f"{name} {version}: a busybox demo image.\n")
    for d in ("actions", "libs"):
        os.makedirs(os.path.join(sd, d), exist_ok=True)
    for link in ("environment", "singularity"):
        target = ".singularity.d/env/90-environment.sh" if link == "environment" \
            else ".singularity.d/runscript"
        p = os.path.join(root, "." + link if link == "environment" else "singularity")
        if not os.path.lexists(p):
            os.symlink(target, p)


def main(argv=None):
    import argparse
    ap = argparse.ArgumentParser(prog="python -m hpcimage.imagebuild.busybox")
    ap.add_argument("--bare", action="store_true", help="only /bin/busybox and its links")
    ap.add_argument("--demo", nargs=2, metavar=("NAME", "VERSION"))
    ap.add_argument("root")
    a = ap.parse_args(argv)
    if a.bare:
        populate(a.root)
    else:
        n, v = a.demo or ("Demo", "1.0")
        demo(a.root, n, v)
    return 0


if __name__ == "__main__":
    sys.exit(main())
