"""The instances' state: ~/.hpcimage/instances/HOST/NAME.json, written atomically
(fsutil) by the supervisor once the instance is up, removed by it when the instance
ends; NAME.lock, held (flock) by whoever starts NAME and then by its supervisor for its
whole life. Standard library only (the join path reads it).

A state file is believed only when all of these hold (`check`), so that a PID reused
after the supervisor died, a reboot, or a file written by hand is never taken for an
instance: the lock is held; the boot id is this boot's; the supervisor's PID is alive,
the user's, and started at the recorded time (clock ticks since boot, /proc/PID/stat);
the instance's PID 1 (its host PID) is alive, the user's, started at the recorded time,
PID 1 of its own PID namespace, and the grandchild of the supervisor.
"""
import fcntl
import os

from hpcimage import fsutil
from hpcimage.errors import HpcimageError, UsageError

VERSION = 1
NAME_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._-")
NAME_MAX = 128
BOOT_ID = "/proc/sys/kernel/random/boot_id"


def check_name(name):
    """Apptainer's instance names: [a-zA-Z0-9._-]+ (and not . or ..: a file name here;
    at most NAME_MAX characters). UsageError (exit 2) otherwise."""
    if (not name or len(name) > NAME_MAX or name in (".", "..")
            or not all(c in NAME_CHARS for c in name)):
        raise UsageError(f"invalid instance name {name!r}: use letters, digits, '.', '_' "
                         f"and '-' (at most {NAME_MAX})")
    return name


def host():
    return os.uname().nodename


def base_dir(home=None, environ=None):
    """~/.hpcimage/instances/HOST (not created)."""
    if home is None:
        environ = os.environ if environ is None else environ
        home = environ.get("HOME")
        if not home:
            import pwd
            home = pwd.getpwuid(os.getuid()).pw_dir
    return os.path.join(home, ".hpcimage", "instances", host())


def make_base(base):
    try:
        os.makedirs(base, 0o700, exist_ok=True)
    except OSError as e:
        raise HpcimageError(f"cannot make the instances directory {base}: {e.strerror}") \
            from None
    st = os.lstat(base)
    if st.st_uid != os.getuid() or os.path.islink(base):
        raise HpcimageError(f"{base}: not a directory owned by you; refusing to use it")


def paths(base, name):
    """name -> its files: json, lock, out, err."""
    p = os.path.join(base, name)
    return {"json": p + ".json", "lock": p + ".lock", "out": p + ".out", "err": p + ".err"}


def boot_id():
    try:
        with open(BOOT_ID) as f:
            return f.read().strip()
    except OSError:
        return ""


def proc_stat(pid):
    """(ppid, start time in clock ticks, state letter) of pid, or None."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
        rest = stat[stat.rindex(b")") + 2:].split()
        return int(rest[1]), int(rest[19]), rest[0].decode()
    except (OSError, ValueError, IndexError):
        return None


def proc_uid_nspid(pid):
    """(real uid, NSpid list) of pid, or (None, [])."""
    uid, nspid = None, []
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("Uid:"):
                    uid = int(line.split()[1])
                elif line.startswith("NSpid:"):
                    nspid = [int(x) for x in line.split()[1:]]
    except (OSError, ValueError):
        return None, []
    return uid, nspid


def start_time(pid):
    s = proc_stat(pid)
    return s[1] if s else None


def lock(path):
    """Take NAME.lock (flock, not blocking): the open fd, or None when another holds it.
    A lock file removed and made again meanwhile (its supervisor ended) is taken anew."""
    for _ in range(20):
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return fd
        os.close(fd)
    return None


def held(path):
    """Someone holds the lock at path."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)


def write(path, data):
    """The state (a dict) as JSON, atomically (fsutil), mode 0600."""
    import json
    fsutil.write_atomic(path, json.dumps(data, indent=1, sort_keys=True) + "\n", mode=0o600)


def read(path):
    """The state dict at path, or None (missing, unreadable, not a state)."""
    from hpcimage.config.policy import loads
    try:
        with open(path, encoding="utf-8") as f:
            data = loads(f.read())
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    if not isinstance(data, dict) or data.get("version") != VERSION:
        return None
    for k in ("name", "image", "supervisor", "supervisor_start", "init", "init_start",
              "boot_id"):
        if k not in data:
            return None
    return data


def check(data, lock_path, uid=None):
    """Why the state is not a live instance of the user's (a string), or None when it
    is (see the module's docstring)."""
    uid = os.getuid() if uid is None else uid
    if not held(lock_path):
        return "its supervisor is gone"
    if data["boot_id"] != boot_id():
        return "written before a reboot"
    try:
        sup, init = int(data["supervisor"]), int(data["init"])
    except (TypeError, ValueError):
        return "not a state file"
    s = proc_stat(sup)
    if s is None or s[2] in "ZX" or s[1] != data["supervisor_start"]:
        return "its supervisor is gone"
    if proc_uid_nspid(sup)[0] != uid:
        return "its supervisor is not yours"
    i = proc_stat(init)
    if i is None or i[2] in "ZX" or i[1] != data["init_start"]:
        return "its PID 1 is gone"
    iuid, nspid = proc_uid_nspid(init)
    if iuid != uid or len(nspid) < 2 or nspid[-1] != 1:
        return "its PID 1 is not an instance's"
    c = proc_stat(i[0])
    if c is None or c[0] != sup:
        return "its PID 1 is not its supervisor's"
    return None


def remove(data_path, lock_path=None):
    """Remove a stale state file (and its lock file when nobody holds it)."""
    for p in (data_path,):
        try:
            os.unlink(p)
        except OSError:
            pass
    if lock_path is not None:
        fd = lock(lock_path)
        if fd is not None:
            try:
                os.unlink(lock_path)
            except OSError:
                pass
            os.close(fd)


def find(name, base=None, uid=None):
    """The live instance NAME of the user: its state dict (with "_base"). Errors: no
    such instance (exit 1), or a stale one (removed, exit 1)."""
    check_name(name)
    base = base_dir() if base is None else base
    p = paths(base, name)
    data = read(p["json"])
    if data is None:
        raise HpcimageError(f"no instance {name!r} (hpcimage instance list)")
    why = check(data, p["lock"], uid)
    if why is not None:
        if not held(p["lock"]):
            remove(p["json"], p["lock"])
        raise HpcimageError(f"instance {name!r} is not running ({why}); refusing to join it")
    data["_base"] = base
    return data


def all_states(base):
    """[(name, state dict or None, paths)] of base, sorted by name."""
    try:
        names = sorted(f[:-5] for f in os.listdir(base) if f.endswith(".json")
                       and not f.startswith("."))
    except OSError:
        return []
    return [(n, read(paths(base, n)["json"]), paths(base, n)) for n in names]
