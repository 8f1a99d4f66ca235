"""The `debootstrap` bootstrap agent: Debian and Ubuntu trees from a mirror.

    python -m hpcimage.imagebuild.debootstrap [--suite bookworm] [--mirror URL] ROOT

Needs root (debootstrap chroots). The tree gets the /.singularity.d layout that
Apptainer writes (env/90-environment.sh, runscript, labels.json).

`into()` is the `Bootstrap: debootstrap` agent of `hpcimage build`: it runs inside the
build's user namespace (root there), in a PID namespace of its own so debootstrap can
mount /proc in the target, and with `container=lxc` so that debootstrap binds the
host's /dev nodes instead of calling mknod (which a user namespace forbids).
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


def into(root, suite, mirror=DEFAULT_MIRROR, include=(), variant="minbase", where="debootstrap",
         verbose=False):
    """debootstrap SUITE into ROOT (must not exist) from MIRROR, as hpcimage build does.

    Its output goes to a log (the last lines make the error message); on a terminal
    one status line shows its latest step ("I: Retrieving ..."). verbose
    (`hpcimage build -v`): its whole output on stderr instead, as Apptainer shows it."""
    from hpcimage.imagebuild import userns
    exe = shutil.which("debootstrap", path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin")
    if exe is None:
        raise HpcimageError(f"{where}: debootstrap not found: install debootstrap")
    cmd = [exe, f"--variant={variant}"]
    if include:
        cmd.append("--include=" + ",".join(include))
    cmd += [suite, root, mirror]
    env = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
           "HOME": "/root", "LANG": "C", "container": "lxc"}
    for k in ("http_proxy", "https_proxy", "no_proxy"):
        if k in os.environ:
            env[k] = os.environ[k]
    print(f"hpcimage: build: debootstrap {suite} from {mirror} (takes a few minutes"
          f"{'' if verbose else '; -v shows its output'})", file=sys.stderr, flush=True)
    log = root + ".debootstrap.log"
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    saved = os.dup(1), os.dup(2)
    status = None
    try:
        if verbose:
            os.dup2(2, 1)           # all of it on stderr, where the build's lines go
        else:
            os.dup2(fd, 1)
            os.dup2(fd, 2)
            status = StatusLine(log, saved[1], "debootstrap")
        rc = userns.run_on_host(cmd, env, what="debootstrap")
    finally:
        if status is not None:
            status.stop()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        os.close(saved[0]), os.close(saved[1]), os.close(fd)
    if rc != 0:
        if verbose:
            tail = "its output is above"
        else:
            with open(log, errors="replace") as f:
                lines = [ln.strip() for ln in f if ln.strip()]
            tail = "; ".join(lines[-3:]) or "no output"
        raise HpcimageError(f"{where}: debootstrap {suite} failed (exit {rc}): {tail}")
    os.unlink(log)
    userns.run_in_root(root, ["/usr/bin/apt-get", "clean"], env, what="apt-get clean")
    return root


class StatusLine:
    """On a terminal (fd), one line redrawn twice a second with the latest line of
    LOG that starts with "I: " (debootstrap's steps), fitted to the terminal's width;
    erased by stop(). Does nothing when fd is not a terminal."""

    def __init__(self, log, fd, label, interval=0.5):
        self.log, self.fd, self.label, self.interval = log, fd, label, interval
        self.thread = None
        if not os.isatty(fd):
            return
        import threading
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _latest(self, f, last):
        for ln in f.read().splitlines():
            if ln.startswith("I: "):
                last = ln[3:].strip()
        return last

    def _run(self):
        last = shown = None
        try:
            with open(self.log, errors="replace") as f:
                while not self.done.wait(self.interval):
                    last = self._latest(f, last)
                    if last and last != shown:
                        shown = last
                        self._draw(f"hpcimage: build: {self.label}: {last}")
        except OSError:
            pass

    def _draw(self, text):
        try:
            cols = os.get_terminal_size(self.fd).columns or 80
        except OSError:
            cols = 80
        try:
            os.write(self.fd, ("\r" + text[:max(cols - 1, 1)] + "\x1b[K").encode())
        except OSError:
            pass

    def stop(self):
        if self.thread is not None:
            self.done.set()
            self.thread.join()
            try:
                os.write(self.fd, b"\r\x1b[K")
            except OSError:
                pass
            self.thread = None


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m hpcimage.imagebuild.debootstrap")
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
