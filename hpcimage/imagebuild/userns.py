"""The build's namespaces: the caller becomes root of a new user namespace, and scripts
run chrooted into the image tree in their own mount and PID namespaces.

Id maps (IdMap.choose, `HPCIMAGE_BUILD_IDMAP=auto|subid|single` forces one):

    root    the caller is root: no user namespace, only a private mount namespace;
    subid   the caller's uid and gid become 0, and the subordinate ranges of
            /etc/subuid and /etc/subgid become 1..N, written by the setuid helpers
            newuidmap/newgidmap (package uidmap): packages owning several ids install,
            `chown` works, the image keeps its owners (as Apptainer's --fakeroot);
    single  no helper or no subordinate range: only uid/gid -> 0. Everything in the
            image belongs to root, `chown` to another id fails (EINVAL); the builder
            makes apt run its downloads as root (APT::Sandbox::User "root") and
            tolerates ownership failures where it copies files itself.

Files that subordinate ids own are, on the host, owned by ids of the caller's range,
so only a process in such a namespace can remove them: a failed build cleans up from
inside it. Standard library only.
"""
import signal
import marshal
import os
import sys

from hpcimage.errors import HpcimageError
from hpcimage.linux import syscalls as sc
from hpcimage.linux import procstate
from hpcimage.linux.paths import resolve_in

from hpcimage.linux.idmap import IdMap, write_maps  # noqa: E402,F401  (builder: userns.IdMap)


def _map(pid, m):
    """Write the maps of process PID (which has unshared its user namespace)."""
    write_maps(pid, m, "build")


def run_as_root(func, args=(), idmap=None):
    """Run func(*args) in a forked child that is root of a new user and mount namespace
    (idmap decides the map); return its result (a plain value, passed back with
    marshal), or raise its HpcimageError here. KeyboardInterrupt in the child is raised
    again here."""
    m = idmap or IdMap.choose()
    r_sync, w_sync = os.pipe()
    r_go, w_go = os.pipe()
    r_res, w_res = os.pipe()
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:                                  # ------------------------- child
        code = 0
        try:
            os.close(r_sync), os.close(w_go), os.close(r_res)
            try:
                if m.mode == "root":
                    sc.unshare(sc.CLONE_NEWNS)
                else:
                    sc.unshare(sc.CLONE_NEWUSER | sc.CLONE_NEWNS)
                os.write(w_sync, b"u")
            except OSError as e:
                os.write(w_sync, b"E" + str(e).encode())
                os._exit(1)
            os.close(w_sync)
            ok = os.read(r_go, 1)
            os.close(r_go)
            if ok != b"g":
                os._exit(1)
            if m.mode == "subid":
                try:
                    os.setgroups([])
                except OSError:
                    pass
            sc.mount(None, "/", None, sc.MS_REC | sc.MS_PRIVATE)
            os.environ["HPCIMAGE_BUILD_IDMAP_MODE"] = m.mode
            try:
                res = {"ok": func(*args)}
            except HpcimageError as e:
                res = {"error": e.message, "status": e.status}
            except KeyboardInterrupt:
                res = {"interrupted": True}
            except BaseException as e:      # noqa: BLE001  (a bug: report it, with where)
                import traceback
                traceback.print_exc()
                res = {"error": f"build failed: internal error: {e!r}", "status": 1}
            try:
                data = marshal.dumps(res)
            except ValueError:              # not a plain value: a bug in the caller
                data = marshal.dumps({"error": "build failed: internal error: result "
                                      f"{type(res.get('ok')).__name__} cannot be passed back",
                                      "status": 1})
            while data:
                n = os.write(w_res, data)
                data = data[n:]
        except BaseException:               # noqa: BLE001
            code = 1
        finally:
            try:
                sys.stdout.flush()
                sys.stderr.flush()
            except Exception:               # noqa: BLE001
                pass
            os._exit(code)
    # ------------------------------------------------------------------- parent
    os.close(w_sync), os.close(r_go), os.close(w_res)
    old = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        msg = os.read(r_sync, 4096)
        os.close(r_sync)
        if msg != b"u":
            os.close(w_go)
            os.waitpid(pid, 0)
            detail = msg[1:].decode(errors="replace") if msg else "no answer"
            raise HpcimageError(f"build: cannot create a user namespace: {detail} (are "
                                "unprivileged user namespaces enabled? see "
                                "user.max_user_namespaces)")
        try:
            if m.mode != "root":
                _map(pid, m)
        except BaseException:
            os.close(w_go)
            os.waitpid(pid, 0)
            raise
        os.write(w_go, b"g")
        os.close(w_go)
        result = sc.read_to_end(r_res)
        _, status = os.waitpid(pid, 0)
    finally:
        signal.signal(signal.SIGINT, old)
    try:
        res = marshal.loads(result) if result else {}
    except (ValueError, EOFError, TypeError):
        res = {}
    if "ok" in res:
        return res["ok"]
    if res.get("interrupted"):
        raise KeyboardInterrupt
    if "error" in res:
        raise HpcimageError(res["error"], res.get("status", 1))
    sig = os.WTERMSIG(status) if os.WIFSIGNALED(status) else None
    raise HpcimageError("build: the build process died" +
                        (f" of signal {sig}" if sig else f" (status {os.waitstatus_to_exitcode(status)})"))


# ------------------------------------------------------------- running in the tree

def _bind(src, dst, ro=False):
    sc.mount(src, dst, None, sc.MS_BIND | sc.MS_REC)
    if ro:
        f = os.statvfs(dst).f_flag
        sc.mount(None, dst, None, sc.MS_REMOUNT | sc.MS_BIND | sc.MS_RDONLY
                 | (f & (sc.MS_NOSUID | sc.MS_NODEV | sc.MS_NOEXEC | 1024 | 2048)))


def _setup_root(root, readonly, extra_binds):
    sc.mount(None, "/", None, sc.MS_REC | sc.MS_PRIVATE)
    if readonly:
        _bind(root, root, ro=True)
    for d in ("proc", "sys", "dev"):
        target = os.path.join(root, d)
        if not os.path.isdir(target) or os.path.islink(target):
            if readonly:
                continue
            if os.path.lexists(target):
                os.unlink(target)
            os.mkdir(target, 0o755)
        if d == "proc":
            try:
                sc.mount("proc", target, "proc", sc.MS_NOSUID | sc.MS_NODEV | sc.MS_NOEXEC)
                continue
            except OSError:
                pass
        _bind("/" + d, target)
    for src, dst in list(extra_binds) + [("/etc/resolv.conf", "/etc/resolv.conf"),
                                         ("/etc/hosts", "/etc/hosts")]:
        if not os.path.exists(src):
            continue
        rel = resolve_in(root, dst)
        target = os.path.join(root, rel)
        if not os.path.isdir(os.path.dirname(target)):
            continue
        if not os.path.lexists(target):
            if readonly:
                continue
            if os.path.isdir(src):
                os.mkdir(target)
            else:
                os.close(os.open(target, os.O_CREAT | os.O_WRONLY, 0o644))
        elif os.path.islink(target):
            continue
        _bind(os.path.realpath(src), target, ro=not os.path.isdir(src))
    os.chroot(root)
    os.chdir("/")


def run_in_root(root, argv, env, readonly=False, extra_binds=(), what="script"):
    """Run argv chrooted into ROOT, in new mount and PID namespaces (/proc, /sys,
    /dev, the host's /etc/resolv.conf and /etc/hosts bound in; ROOT read-only when
    asked). Output goes to our stdout/stderr. Returns the exit status (128+N for a
    signal); raises HpcimageError when the set-up fails."""
    return _spawn(lambda: _setup_root(root, readonly, extra_binds), argv, env, what,
                  pidns=True)


def start_in_root(root, argv, env, readonly=False, extra_binds=(), what="script"):
    """run_in_root, without waiting: returns a Child (wait() gives the exit status)."""
    return _Child(*_start(lambda: _setup_root(root, readonly, extra_binds), argv, env,
                          what, pidns=True))


def run_on_host(argv, env, cwd=None, what="script", pidns=True):
    """Run argv in new mount and PID namespaces, without chroot (%setup, debootstrap)."""
    def setup():
        sc.mount(None, "/", None, sc.MS_REC | sc.MS_PRIVATE)
        if cwd:
            os.chdir(cwd)
    return _spawn(setup, argv, env, what, pidns=pidns)


def _spawn(setup, argv, env, what, pidns):
    return _Child(*_start(setup, argv, env, what, pidns)).wait()


class _Child:
    """A process started by _start: wait() returns its exit status (128+N for a
    signal) or raises HpcimageError when its set-up failed; kill() stops it."""

    def __init__(self, pid, r_err):
        self.pid, self.r_err, self.status = pid, r_err, None

    def wait(self):
        if self.status is not None:
            return self.status
        msg = sc.read_to_end(self.r_err)
        try:
            _, st = os.waitpid(self.pid, 0)
        except KeyboardInterrupt:
            os.kill(self.pid, signal.SIGKILL)
            os.waitpid(self.pid, 0)
            raise
        if msg:
            self.status = 127
            raise HpcimageError(msg.decode(errors="replace"))
        self.status = (os.waitstatus_to_exitcode(st) if os.WIFEXITED(st)
                       else 128 + os.WTERMSIG(st))
        return self.status

    def kill(self):
        if self.status is None:
            try:
                os.kill(self.pid, signal.SIGKILL)   # its pid-1 child dies with it (PDEATHSIG)
            except ProcessLookupError:
                pass
            try:
                self.wait()
            except HpcimageError:
                pass


def _start(setup, argv, env, what, pidns):
    r_err, w_err = os.pipe2(os.O_CLOEXEC)
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(r_err)
            sc.prctl(sc.PR_SET_PDEATHSIG, signal.SIGKILL)
            sc.unshare(sc.CLONE_NEWNS | (sc.CLONE_NEWPID if pidns else 0))
            if pidns:
                inner = os.fork()
                if inner:
                    os.close(w_err)
                    signal.signal(signal.SIGINT, signal.SIG_IGN)
                    _, st = os.waitpid(inner, 0)
                    os._exit(os.waitstatus_to_exitcode(st) if os.WIFEXITED(st)
                             else 128 + os.WTERMSIG(st))
                sc.prctl(sc.PR_SET_PDEATHSIG, signal.SIGKILL)
                signal.signal(signal.SIGINT, signal.SIG_DFL)
            setup()
            procstate.for_exec()                # the caller's signal state, not ours
            os.execve(argv[0], argv, env)
        except BaseException as e:              # noqa: BLE001
            msg = f"{what}: {e.strerror or e}" if isinstance(e, OSError) else f"{what}: {e}"
            if isinstance(e, OSError) and e.filename:
                msg += f": {e.filename}"
            try:
                os.write(w_err, msg.encode()[:4000])
            finally:
                os._exit(127)
    os.close(w_err)
    return pid, r_err
