"""Shared set-up: the non-root test user, the installed package, cached test images.

Containers are started as HPCIMAGE_TEST_USER (default `hpcuser`, created by
scripts/setup.sh), through the interpreter of /opt/hpcimage/venv, which holds the
package installed from this checkout (reinstalled here when the sources changed, so
`pytest` alone always tests the working tree; /opt/hpcimage/venv is a symbolic link to
the current versioned venv that scripts/install.sh made, and pip through the link's
interpreter installs into that venv. This in-place reinstall is for a test machine only:
a live system upgrades with install.sh, beside the old venv). Images are built once
and cached under HPCIMAGE_CACHE (default /var/cache/hpcimage/test-images).
"""
import hashlib
import os
import pwd
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
VENV = Path(os.environ.get("HPCIMAGE_VENV", "/opt/hpcimage/venv"))
PY = str(VENV / "bin" / "python3")
USER = os.environ.get("HPCIMAGE_TEST_USER", "hpcuser")
CACHE = Path(os.environ.get("HPCIMAGE_CACHE", "/var/cache/hpcimage/test-images"))
TESTDATA = Path(os.environ.get("HPCIMAGE_TESTDATA", REPO.parent / "shared" / "testdata"))


# ------------------------------------------------------ files the test user reads
#
# The checkout may sit where the test user cannot read (a clone under /root, mode
# 0700). What a test hands to that user (definition files, C sources, scripts) comes
# from a session copy every user can read, made on first use; User.run refuses a path
# inside the checkout, so a test that forgets passes nowhere.

_READABLE = []


def readable(rel):
    """REPO/rel, copied (once per session, with its whole top-level directory) to a
    place the test user can read; returns the copy's Path."""
    rel = Path(rel)
    if rel.is_absolute():
        rel = rel.relative_to(REPO)
    if not _READABLE:
        base = Path("/tmp/hpcimage-tests")
        base.mkdir(exist_ok=True)
        base.chmod(0o755)
        top = Path(tempfile.mkdtemp(dir=base, prefix="checkout-"))
        top.chmod(0o755)
        _READABLE.append(top)
    top = _READABLE[0]
    first = rel.parts[0]
    if not (top / first).exists():
        src = REPO / first
        tmp = top / (first + ".copying")
        if src.is_dir():
            shutil.copytree(src, tmp, symlinks=True,
                            ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(src, tmp)
        subprocess.run(["chmod", "-R", "a+rX", str(tmp)], check=True)
        os.rename(tmp, top / first)
    return top / rel


def pytest_sessionfinish(session):
    for top in _READABLE:
        shutil.rmtree(top, ignore_errors=True)


def in_checkout(word):
    """The path inside the checkout that `word` names or ends with (`--opt=PATH`,
    `K=PATH`), else None."""
    word = str(word)
    repo = str(REPO)
    i = word.find(repo)
    if i < 0:
        return None
    rest = word[i + len(repo):]
    if rest and rest[0] != "/":
        return None
    return word[i:]


def assert_user_can_reach(argv, cwd=None, env=None):
    """A run as the test user names no path inside the checkout (see readable())."""
    words = [*map(str, argv), *([str(cwd)] if cwd else []), *(env or {}).values()]
    bad = [p for p in map(in_checkout, words) if p]
    assert not bad, (f"a test runs {argv[0]} as the test user with {bad[0]}, inside the "
                     f"checkout, which that user may not be able to read (a clone under "
                     f"/root): pass conftest.readable(...) instead")


def _tree_digest(root):
    h = hashlib.sha256()
    for p in sorted(q for ext in ("*.py", "*.c") for q in Path(root).rglob(ext)):
        if "__pycache__" in p.parts:
            continue
        h.update(str(p.relative_to(root)).encode())
        h.update(p.read_bytes())
    return h.hexdigest()


def _installed_package_dir():
    r = subprocess.run([PY, "-I", "-c", "import hpcimage, os; print(os.path.dirname(hpcimage.__file__))"],
                       capture_output=True, text=True)
    return r.stdout.strip() if r.returncode == 0 else None


def pytest_sessionstart(session):
    if os.geteuid() != 0:
        pytest.exit("the test suite runs as root (it starts containers as a non-root user)", 2)
    try:
        pwd.getpwnam(USER)
    except KeyError:
        pytest.exit(f"test user {USER} missing: run scripts/setup.sh", 2)
    inst = _installed_package_dir()
    if inst is None or _tree_digest(inst) != _tree_digest(REPO / "hpcimage"):
        subprocess.run([PY, "-m", "pip", "install", "-q", "--no-deps", "--force-reinstall",
                        "--no-build-isolation", str(REPO)], check=True,
                       stdout=subprocess.DEVNULL)
        subprocess.run(["chmod", "-R", "a+rX", str(VENV)], check=True)
    os.makedirs("/var/lib/hpcimage/mnt", exist_ok=True)
    if os.path.exists("/dev/fuse"):
        os.chmod("/dev/fuse", 0o666)


# ------------------------------------------------------------------ the user

class User:
    def __init__(self, name):
        pw = pwd.getpwnam(name)
        self.name, self.uid, self.gid, self.home = name, pw.pw_uid, pw.pw_gid, pw.pw_dir

    def env(self, extra=None):
        env = {"HOME": self.home, "USER": self.name, "LOGNAME": self.name,
               "PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8",
               "TERM": "dumb"}
        env.update(extra or {})
        return env

    def popen(self, argv, env=None, cwd=None, root=False, **kw):
        if root:
            e = dict(self.env(env), HOME="/root", USER="root", LOGNAME="root")
            return subprocess.Popen(argv, env=e, cwd=cwd or "/", **kw)
        assert_user_can_reach(argv, cwd, env)
        return subprocess.Popen(argv, env=self.env(env), cwd=cwd or self.home,
                                user=self.uid, group=self.gid, extra_groups=[], **kw)

    def run(self, argv, env=None, cwd=None, input=None, timeout=120, root=False):
        p = self.popen(argv, env=env, cwd=cwd, root=root, stdin=subprocess.PIPE,
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            out, err = p.communicate(input, timeout=timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            out, err = p.communicate()
            raise AssertionError(f"timed out: {argv}\n{out}\n{err}")
        return subprocess.CompletedProcess(argv, p.returncode, out, err)


@pytest.fixture(scope="session")
def user():
    return User(USER)


def on_terminal(user, argv, env=None, cwd=None, answers=(), controlling=False,
                columns=None, timeout=120):
    """Run argv as user with its stderr on a pseudo-terminal (stdout a pipe, stdin
    /dev/null), or with controlling=True stdin, stdout and stderr on it as its
    controlling terminal; columns: the terminal's width. Each answer of answers
    [(text awaited, line typed)] is typed once its text has appeared (the terminal
    then shows "<answered>"). Returns (exit status, what the terminal showed)."""
    import fcntl
    import pty
    import select
    import struct
    import termios
    master, slave = pty.openpty()
    if columns:
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, columns, 0, 0))
    if controlling:
        kw = dict(stdin=slave, stdout=slave, stderr=slave, start_new_session=True,
                  preexec_fn=lambda: fcntl.ioctl(0, termios.TIOCSCTTY, 0))
    else:
        kw = dict(stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=slave)
    p = user.popen(argv, env=env, cwd=None if cwd is None else str(cwd), **kw)
    os.close(slave)
    out, pending = b"", list(answers)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pending and pending[0][0].encode() in out:
            os.write(master, pending.pop(0)[1].encode() + b"\n")
            out += b"<answered>"
        ready, _, _ = select.select([master], [], [], 0.2)
        if ready:
            try:
                chunk = os.read(master, 65536)
            except OSError:
                break
            if not chunk:
                break
            out += chunk
        elif p.poll() is not None:
            break
    os.close(master)
    p.wait(timeout)
    if p.stdout:
        p.stdout.close()
    return p.returncode, out.decode(errors="replace")


def runtime_argv(*args):
    return [PY, "-I", "-m", "hpcimage.runtime", *args]


def cli_argv(*args):
    return [PY, "-I", "-m", "hpcimage.cli", *args]


@pytest.fixture
def userdir(user):
    """A fresh directory owned by the test user, reachable by them."""
    base = Path("/tmp/hpcimage-tests")
    base.mkdir(exist_ok=True)
    base.chmod(0o755)
    d = Path(tempfile.mkdtemp(dir=base))
    os.chown(d, user.uid, user.gid)
    d.chmod(0o755)
    yield d
    shutil.rmtree(d, ignore_errors=True)


# ----------------------------------------------------------------- the images

def _mksquashfs(src, out):
    tmp = str(out) + ".tmp"
    subprocess.run(["mksquashfs", str(src), tmp, "-noappend", "-quiet", "-no-progress",
                    "-all-root"], check=True, stdout=subprocess.DEVNULL)
    os.chmod(tmp, 0o644)
    os.replace(tmp, out)


def _cached(name, build):
    """Build CACHE/name with build(path) once (atomically); return the path."""
    CACHE.mkdir(parents=True, exist_ok=True)
    for p in (CACHE.parent, CACHE):
        p.chmod(0o755)
    path = CACHE / name
    if not path.exists():
        tmp = CACHE / (name + ".building")
        if tmp.is_dir():
            shutil.rmtree(tmp)
        elif tmp.exists():
            tmp.unlink()
        build(tmp)
        subprocess.run(["chmod", "-R", "a+rX", str(tmp)], check=True)
        os.rename(tmp, path)
    return path


def _demo_tree(path):
    subprocess.run([sys.executable, "-m", "hpcimage.imagebuild.busybox", str(path)], check=True,
                   cwd=REPO)
    env = path / ".singularity.d" / "env"
    (env / "10-first.sh").write_text("export ORDER=first\nexport FROM_ENV=10\n")
    (env / "50-second.sh").write_text('export ORDER="$ORDER second"\nexport FROM_ENV=50\n')


@pytest.fixture(scope="session")
def demo_dir():
    """Busybox image with /.singularity.d (runscript, env scripts, labels)."""
    return _cached("demo-v1", _demo_tree)


@pytest.fixture(scope="session")
def demo_sqfs(demo_dir):
    return _cached("demo-v1.sqfs", lambda p: _mksquashfs(demo_dir, p))


@pytest.fixture(scope="session")
def bare_dir():
    """Only /bin/busybox and its links: no /etc, /home, /tmp, /proc, /dev ..."""
    return _cached("bare-v1", lambda p: subprocess.run(
        [sys.executable, "-m", "hpcimage.imagebuild.busybox", "--bare", str(p)], check=True, cwd=REPO))


@pytest.fixture(scope="session")
def bare_sqfs(bare_dir):
    return _cached("bare-v1.sqfs", lambda p: _mksquashfs(bare_dir, p))


@pytest.fixture(scope="session")
def demo_sif(demo_dir):
    def build(p):
        tmp = str(p) + ".sif"
        subprocess.run(cli_argv("build", tmp, str(demo_dir)), check=True,
                       stdout=subprocess.DEVNULL)
        os.rename(tmp, p)
    return _cached("demo-v1.sif", build)


@pytest.fixture(params=["dir", "sqfs", "sif"])
def image(request, demo_dir, demo_sqfs, demo_sif):
    return str({"dir": demo_dir, "sqfs": demo_sqfs, "sif": demo_sif}[request.param])


@pytest.fixture(params=["dir", "sqfs"])
def bare(request, bare_dir, bare_sqfs):
    return str(bare_dir if request.param == "dir" else bare_sqfs)


def _debian_tree(path):
    r = subprocess.run([sys.executable, "-m", "hpcimage.imagebuild.debootstrap", str(path)],
                       cwd=REPO, capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot build the Debian 12 image (no mirror?): {r.stderr.strip()}")


@pytest.fixture(scope="session")
def debian_dir():
    return _cached("debian12-v1", _debian_tree)


@pytest.fixture(scope="session")
def debian_sqfs(debian_dir):
    return _cached("debian12-v1.sqfs", lambda p: _mksquashfs(debian_dir, p))


# ------------------------------------------------------------------ leak checks

# The helpers a launch leaves beside the command (they die with it): the FUSE daemons
# and the overlays' lock holder.
LAUNCH_HELPERS = ("squashfuse", "fuse2fs", "fuse-overlayfs", "gocryptfs", "hpcimage-lock")


def fuse_processes(uid=None):
    """The pids of the launch helpers (LAUNCH_HELPERS) of uid (default: anyone's)."""
    return [pid for pid, _comm in launch_helpers(uid)]


def launch_helpers(uid=None):
    """(pid, name) of each launch helper (LAUNCH_HELPERS, not a zombie) of uid."""
    out = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/stat") as f:
                stat = f.read()
            comm = stat[stat.index("(") + 1:stat.rindex(")")]
            state = stat[stat.rindex(")") + 2]
            if not comm.startswith(LAUNCH_HELPERS) or state == "Z":
                continue
            if uid is not None and os.stat(f"/proc/{pid}").st_uid != uid:
                continue
            out.append((int(pid), comm))
        except (OSError, ValueError):
            continue
    return out


def host_mounts_of_ours():
    with open("/proc/self/mountinfo") as f:
        return [ln for ln in f if "squashfuse" in ln or "gocryptfs" in ln
                or "/var/lib/hpcimage/mnt" in ln]


def wait_no_leaks(uid=None, timeout=5.0):
    deadline = time.monotonic() + timeout
    while fuse_processes(uid) and time.monotonic() < deadline:
        time.sleep(0.05)
    return fuse_processes(uid), host_mounts_of_ours()


@pytest.fixture(autouse=True)
def no_leaks_after(request):
    yield
    if "noleakcheck" in request.keywords:
        return
    procs, mounts = wait_no_leaks()
    for pid in procs:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
    assert not procs, f"helper processes (squashfuse, fuse2fs, ...) left behind: {procs}"
    assert not mounts, f"mounts left on the host: {mounts}"
