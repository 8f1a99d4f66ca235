"""The `debootstrap` bootstrap agent: Debian and Ubuntu trees from a mirror.

    python -m hpcimage.build.debootstrap [--suite bookworm] [--mirror URL] ROOT

Needs root (debootstrap chroots). The tree gets the /.singularity.d layout that
Apptainer writes (env/90-environment.sh, runscript, labels.json).
"""
import argparse
import json
import os
import shutil
import subprocess
import sys

from hpcimage.errors import HpcimageError

DEFAULT_MIRROR = "http://deb.debian.org/debian"

ENV_SCRIPT = """# Sourced by hpcimage and Apptainer before every command in the image.
export LC_ALL=C.UTF-8
export HPCIMAGE_DEBIAN_ENV=1
"""

RUNSCRIPT = """#!/bin/sh
exec /bin/bash "$@"
"""


def bootstrap(root, suite="bookworm", mirror=DEFAULT_MIRROR, variant="minbase",
              include=()):
    if shutil.which("debootstrap") is None:
        raise HpcimageError("debootstrap not found: install debootstrap")
    if os.path.exists(root):
        raise HpcimageError(f"{root}: exists already")
    tmp = root + ".partial"
    shutil.rmtree(tmp, ignore_errors=True)
    cmd = ["debootstrap", f"--variant={variant}"]
    if include:
        cmd.append("--include=" + ",".join(include))
    cmd += [suite, tmp, mirror]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        shutil.rmtree(tmp, ignore_errors=True)
        last = (r.stderr.strip() or r.stdout.strip()).splitlines()[-1:] or ["?"]
        raise HpcimageError(f"debootstrap {suite} failed: {last[0]}")
    subprocess.run(["chroot", tmp, "apt-get", "clean"], capture_output=True)
    sd = os.path.join(tmp, ".singularity.d")
    os.makedirs(os.path.join(sd, "env"), exist_ok=True)
    with open(os.path.join(sd, "env", "90-environment.sh"), "w") as f:
        f.write(ENV_SCRIPT)
    with open(os.path.join(sd, "runscript"), "w") as f:
        f.write(RUNSCRIPT)
    os.chmod(os.path.join(sd, "runscript"), 0o755)
    with open(os.path.join(sd, "labels.json"), "w") as f:
        json.dump({"org.label-schema.name": f"Debian {suite}",
                   "org.label-schema.build-agent": "hpcimage debootstrap"}, f, indent=2)
    os.rename(tmp, root)
    return root


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m hpcimage.build.debootstrap")
    ap.add_argument("--suite", default="bookworm")
    ap.add_argument("--mirror", default=DEFAULT_MIRROR)
    ap.add_argument("--include", default="")
    ap.add_argument("root")
    a = ap.parse_args(argv)
    try:
        bootstrap(a.root, a.suite, a.mirror,
                  include=[p for p in a.include.split(",") if p])
    except HpcimageError as e:
        print(f"hpcimage: error: {e}", file=sys.stderr)
        return e.status
    return 0


if __name__ == "__main__":
    sys.exit(main())
