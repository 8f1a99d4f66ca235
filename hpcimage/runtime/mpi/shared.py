"""The per-node shared container of an MPI job: the holder that sets it up and keeps
it, the state directory, and how a rank joins it (setns). Standard library only."""
import fcntl
import os

from hpcimage.errors import HpcimageError
from hpcimage.linux import syscalls as sc
from hpcimage.linux import procstate
from hpcimage.runtime.mpi.jobenv import FORWARD_PREFIXES
from hpcimage.runtime.mpi.recipe import Recipe, write_recipe


def state_base():
    base = os.path.join(os.environ.get("HPCIMAGE_MPI_STATE", "/tmp"), f"hpcimage-{os.getuid()}")
    try:
        os.mkdir(base, 0o700)
    except FileExistsError:
        pass
    st = os.lstat(base)
    if st.st_uid != os.getuid() or not os.path.isdir(base) or os.path.islink(base):
        raise HpcimageError(f"{base}: not a directory owned by you; refusing to use it")
    return base


def _alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
        return stat[stat.rindex(")") + 2] not in "ZX"
    except (OSError, ValueError):
        return False


def _read_pid(path):
    try:
        with open(path) as f:
            return int(f.read().strip() or 0)
    except (OSError, ValueError):
        return 0


def _warm(cmd, path):
    """Read the program and the libraries it loads (its DT_NEEDED, through the image's
    ld.so.cache, and the dynamic loader) once, in the container: a fresh image mount
    has a cold page cache, and 32 ranks faulting the same pages through FUSE at once is
    the slowest part of a launch. Best effort."""
    from hpcimage.linux.paths import which
    from hpcimage.host import HostRoot, elf
    from hpcimage.host.ldcache import LdCache
    exe = which(cmd, path)
    if not exe or not os.path.isfile(exe):
        return
    files, todo, seen = [exe], [exe], set()
    cache = LdCache(HostRoot("/"))
    while todo and len(files) < 64:
        try:
            needed = elf.info(todo.pop()).needed
        except (OSError, ValueError):
            continue
        for n in needed:
            if n not in seen:
                seen.add(n)
                lib = cache.find(n)
                if lib:
                    files.append(lib)
                    todo.append(lib)
    files += ["/lib64/ld-linux-x86-64.so.2", "/lib/ld-linux-aarch64.so.1"]
    buf = bytearray(1 << 20)
    for f in files:
        try:
            fd = os.open(f, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            continue
        try:
            while os.readv(fd, [buf]):
                pass
        except OSError:
            pass
        finally:
            os.close(fd)


def warm_arg(tail):
    """(command, the container's PATH) of a tail's exec step, or None."""
    from hpcimage.runtime.ops import Exec
    op = tail.ops[-1]
    if type(op) is not Exec or not op.argv:
        return None
    return op.argv[0], op.env.get("PATH", "")


PROBE_SUFFIX = "~hpcimage-probe"


def _read_all(fd):
    """Everything from fd up to end of file; closes fd."""
    chunks = []
    try:
        while True:
            chunk = os.read(fd, 65536)
            if not chunk:
                return b"".join(chunks)
            chunks.append(chunk)
    finally:
        os.close(fd)


# In an env script, these words read variables indirectly or run other code: no probe.
INDIRECT = {".", "source", "eval", "printenv", "env", "set", "declare", "typeset", "compgen",
            "-p"}   # -p: export -p


def _scripts_look_static(varies):
    """The image's env scripts name no per-rank variable (the planning environment may
    lack those, so the probe alone cannot see them being read) and read none
    indirectly. Comment lines are skipped."""
    names = FORWARD_PREFIXES + ("HFI_", "IPATH_")
    try:
        files = sorted(f for f in os.listdir(ENV_DIR) if f.endswith(".sh"))
    except OSError:
        return False
    for f in files:
        try:
            with open(os.path.join(ENV_DIR, f), errors="replace") as fh:
                text = "\n".join(ln for ln in fh.read().splitlines()
                                 if not ln.lstrip().startswith("#"))
        except OSError:
            return False
        for c in ";&|()`\n\t":
            text = text.replace(c, " ")
        if any(n in text for n in names) or INDIRECT.intersection(text.split(" ")):
            return False
    return True


ENV_DIR = "/.singularity.d/env"


def _probe_env(script, shell_env, workdir, home, varies, keep):
    """The environment the image's env scripts leave for the program, found once in the
    container by running the rank prologue with `env -0` as the program: twice, the
    second time with every per-rank variable changed. When the scripts pass per-rank
    variables through untouched and derive nothing from them, that environment (less
    `_`) serves every rank: hpcimage-join then execs the program without /bin/sh.
    Returns it as a dict, or None (scripts that read per-rank values, no env -0, ...)."""
    from hpcimage.runtime.command import enter_workdir
    if not os.access("/bin/sh", os.X_OK) or not _scripts_look_static(varies):
        return None

    def run(env):
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            try:
                os.dup2(w, 1)
                null = os.open(os.devnull, os.O_RDWR)
                os.dup2(null, 0)
                os.dup2(null, 2)
                enter_workdir(workdir, home, False)
                procstate.for_exec()
                os.execve("/bin/sh", ["/bin/sh", "-c", script, "hpcimage", "env", "-0"], env)
            finally:
                os._exit(127)
        os.close(w)
        out = _read_all(r)
        _, status = os.waitpid(pid, 0)
        if status != 0 or not out.endswith(b"\0"):
            return None
        res = {}
        for item in out[:-1].split(b"\0"):
            k, eq, v = item.partition(b"=")
            if not eq:
                return None
            res[os.fsdecode(k)] = os.fsdecode(v)
        res.pop("_", None)
        return res
    changed = {k for k in shell_env if varies(k) and k not in keep and k != "PWD"}
    first = run(shell_env)
    second = run({k: v + PROBE_SUFFIX if k in changed else v for k, v in shell_env.items()})
    if first is None or second is None or first.keys() != second.keys():
        return None
    for k, v in first.items():
        if k in changed:
            if v != shell_env[k] or second[k] != v + PROBE_SUFFIX:
                return None
        elif second[k] != v or PROBE_SUFFIX in v:
            return None
    return first


def start_holder(head, state, refs_path, close_fds=(), warm=None, probe=None):
    """Fork the holder: it carries out head (up to pivot_root), runs the environment
    probe (probe: _probe_env's arguments), reports ready, warms the page cache for the
    program (warm: (command, PATH)), then waits until no rank holds `refs`, and exits.
    Returns (pid, the probe's environment or None)."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(r)
            for fd in close_fds:           # the rank's refs lock must not live on here
                os.close(fd)
            os.setsid()
            null = os.open(os.devnull, os.O_RDWR)
            for fd in (0, 1):
                os.dup2(null, fd)
            procstate.helper_signals()      # signals are for the program; the holder
                                            # lives while any rank does (refs)
            from hpcimage.runtime.execute import execute
            if warm:                    # what _warm needs, imported while the host is seen
                from hpcimage.host import elf, ldcache  # noqa: F401
            try:
                execute(head)
            except HpcimageError as e:
                os.write(w, ("E" + e.message).encode())
                os._exit(1)
            os.dup2(null, 2)
            fd = os.open(refs_path, os.O_RDONLY | os.O_CLOEXEC)
            final = None
            if probe:
                try:
                    final = _probe_env(*probe)
                except Exception:               # noqa: BLE001  (only a speed-up)
                    final = None
            reply = b"R"
            if final is not None:
                reply += b"".join(os.fsencode(f"{k}={v}") + b"\0" for k, v in final.items())
            while reply:
                reply = reply[os.write(w, reply):]
            os.close(w)
            if warm:
                try:
                    _warm(*warm)
                except Exception:               # noqa: BLE001  (only a speed-up)
                    pass
            fcntl.flock(fd, fcntl.LOCK_EX)         # every rank has exited
            m = os.open(os.path.dirname(state), os.O_RDONLY | os.O_DIRECTORY)
            fcntl.flock(m, fcntl.LOCK_EX)
            for name in ("holder", "refs", "recipe"):
                try:
                    os.unlink(os.path.join(state, name))
                except OSError:
                    pass
            try:
                os.rmdir(state)
            except OSError:
                pass
        except BaseException:
            pass
        os._exit(0)
    os.close(w)
    msg = _read_all(r)
    if not msg.startswith(b"R"):
        try:
            os.waitpid(pid, 0)
        except ChildProcessError:
            pass
        text = msg[1:].decode(errors="replace") if msg.startswith(b"E") else "holder died"
        raise HpcimageError(text)
    final = None
    if len(msg) > 1:
        final = {}
        for item in msg[1:-1].split(b"\0"):
            k, _eq, v = item.partition(b"=")
            final[os.fsdecode(k)] = os.fsdecode(v)
    return pid, final


def _locked_fd(fd, base):
    """The job lock that hpcimage-join hands over (HPCIMAGE_MPI_LOCKED_FD=fd), or None."""
    if not fd or not fd.isdigit():
        return None
    fd = int(fd)
    try:
        a, b = os.fstat(fd), os.stat(base)
    except OSError:
        return None
    if (a.st_dev, a.st_ino) != (b.st_dev, b.st_ino):
        return None
    os.set_inheritable(fd, False)
    return fd


def join_shared(plan, key, environ=None, signature=None, locked=None, cleanenv=False):
    """Set up (first rank) or find the node's shared container for job `key`, join its
    namespaces, and return the tail of the plan (chdir, exec) to carry out."""
    from hpcimage.runtime import plan as launch
    from hpcimage.runtime.ops import Chdir
    head, tail = launch.split(plan, Chdir)
    base = state_base()
    state = os.path.join(base, key)
    refs_path = os.path.join(state, "refs")
    m = _locked_fd(locked, base)
    if m is None:
        m = os.open(base, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    for _attempt in range(50):
        fcntl.flock(m, fcntl.LOCK_EX)
        try:
            os.makedirs(state, 0o700, exist_ok=True)
            if not os.path.exists(refs_path):
                open(refs_path, "a").close()
            refs = os.open(refs_path, os.O_RDONLY)
            os.set_inheritable(refs, True)  # held by the application until it exits
            try:
                fcntl.flock(refs, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:                          # holder tearing down
                os.close(refs)
                refs = None
            if refs is not None:
                pid = _read_pid(os.path.join(state, "holder"))
                if not (pid and _alive(pid)):
                    rec = None
                    if signature is not None:
                        try:
                            rec = Recipe(tail, environ, signature, os.getcwd(), cleanenv)
                        except OSError:
                            pass
                    pid, final = start_holder(head, state, refs_path, (refs, m),
                                               warm_arg(tail),
                                               rec.probe_args() if rec and rec.ok else None)
                    tmp = os.path.join(state, "holder.tmp")
                    with open(tmp, "w") as f:
                        f.write(str(pid))
                    os.rename(tmp, os.path.join(state, "holder"))
                    if rec is not None and rec.ok:    # the other ranks: hpcimage-join
                        rec.final = final
                        write_recipe(state, rec.encode())
                user_fd = os.open(f"/proc/{pid}/ns/user", os.O_RDONLY | os.O_CLOEXEC)
                mnt_fd = os.open(f"/proc/{pid}/ns/mnt", os.O_RDONLY | os.O_CLOEXEC)
        finally:
            fcntl.flock(m, fcntl.LOCK_UN)
        if refs is None:
            import time
            time.sleep(0.05)
            continue
        if os.getuid() != 0:
            sc.setns(user_fd, sc.CLONE_NEWUSER)
        sc.setns(mnt_fd, sc.CLONE_NEWNS)
        os.close(user_fd)
        os.close(mnt_fd)
        os.close(m)
        os.chdir("/")
        return tail
    raise HpcimageError("could not join the node's shared container")
