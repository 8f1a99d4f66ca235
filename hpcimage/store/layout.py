"""The central store's layout: the manifest's and the lock's names, temporary names and
their clean-up, the store lock, directories made and synced."""
import errno
import fcntl
import os
import sys
import time

from hpcimage.errors import HpcimageError
from hpcimage.runtime import localcopy as local


MANIFEST = local.MANIFEST


STORE_LOCK = ".hpcimage.lock"


PREVIOUS = ".hpcimage-previous"


TMP_MARK = ".hpcimage-tmp."


def now_iso(t=None):
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() if t is None else t))


def makedirs(path, mode=0o755):
    try:
        os.makedirs(path, mode=mode, exist_ok=True)
    except FileExistsError:
        raise HpcimageError(f"cannot create directory {path}: a file is in the way") from None
    except OSError as e:
        raise HpcimageError(f"cannot create directory {path}: {e.strerror}") from None
    if not os.path.isdir(path):
        raise HpcimageError(f"cannot create directory {path}: a file is in the way")


def _pid_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_temps(directory, prefix_name=None, all_stale=True):
    """Remove `.NAME.hpcimage-tmp.PID` files in `directory` (only NAME's when given).

    The caller holds the lock that writers of these files hold, so every one is
    stale; with all_stale=False only those whose PID is dead go. Returns the names."""
    removed = []
    try:
        names = os.listdir(directory)
    except OSError:
        return removed
    want = None if prefix_name is None else f".{prefix_name}{TMP_MARK}"
    for n in names:
        if not n.startswith(".") or TMP_MARK not in n:
            continue
        if want is not None and not n.startswith(want):
            continue
        pid = n.rpartition(TMP_MARK)[2].split(".")[0]     # PID or PID.state
        if not pid.isdigit():
            continue
        if not all_stale and _pid_alive(int(pid)):
            continue
        try:
            os.unlink(os.path.join(directory, n))
            removed.append(n)
        except FileNotFoundError:
            pass
        except OSError:
            pass
    return removed


class Lock:
    """fcntl.flock on a lock file; `wait_message` is shown (on a tty) while waiting.

    Where the file system has no locks (ENOLCK, EOPNOTSUPP: an NFS mount without lockd)
    it warns and goes on unlocked; `locked` then is False."""

    def __init__(self, path, shared=False, create_mode=0o644, wait_message=None, err=None,
                 prog="hpcimage"):
        self.path = path
        self.prog = prog
        self.shared = shared
        self.create_mode = create_mode
        self.wait_message = wait_message
        self.err = err or sys.stderr
        self.fd = None
        self.locked = False

    def __enter__(self):
        flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
        try:
            self.fd = os.open(self.path, flags, self.create_mode)
        except OSError as e:
            if e.errno == errno.ELOOP:
                raise HpcimageError(f"{self.path} is a symbolic link: refusing to use it "
                                    "as a lock file; remove it") from None
            raise HpcimageError(f"cannot open lock file {self.path}: {e.strerror}") from None
        op = fcntl.LOCK_SH if self.shared else fcntl.LOCK_EX
        try:
            try:
                fcntl.flock(self.fd, op | fcntl.LOCK_NB)
            except BlockingIOError:
                if self.wait_message and isatty(self.err):
                    self.err.write(self.wait_message + "\n")
                    self.err.flush()
                fcntl.flock(self.fd, op)
            self.locked = True
        except OSError as e:
            if e.errno in (errno.ENOLCK, errno.EOPNOTSUPP):
                self.err.write(f"{self.prog}: warning: cannot lock {self.path} ({e.strerror}): "
                               "going on without the lock\n")
                return self
            os.close(self.fd)
            self.fd = None
            raise HpcimageError(f"cannot lock {self.path}: {e.strerror}") from None
        return self

    def __exit__(self, *exc):
        if self.fd is not None:
            os.close(self.fd)        # releases the flock
            self.fd = None


def isatty(stream):
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def identity_matches(st, entry):
    return (entry is not None and st.st_size == entry.get("size")
            and st.st_mtime_ns == entry.get("mtime_ns"))
