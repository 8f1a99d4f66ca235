"""The per-node shared container of an MPI job: the holder that sets it up and keeps
it, the state directory, and how a rank joins it (setns). Standard library only."""
import fcntl
import os

from hpcimage.errors import HpcimageError
from hpcimage.image.baseenv import ENV_FILES     # read in the container (after pivot_root)
from hpcimage.linux import syscalls as sc
from hpcimage.linux import procstate
from hpcimage.runtime.mpi.jobenv import FORWARD_PREFIXES, local_tasks
from hpcimage.runtime.mpi.recipe import Recipe, write_recipe


def state_base():
    """The user's directory of per-job state on this node: $HPCIMAGE_MPI_STATE (default
    /tmp)/hpcimage-UID, made 0700 when missing; the last holder on the node removes it.
    Errors: HpcimageError (exit 1) when it cannot be made or is not the user's."""
    top = os.environ.get("HPCIMAGE_MPI_STATE", "/tmp")
    base = os.path.join(top, f"hpcimage-{os.getuid()}")
    try:
        os.mkdir(base, 0o700)
    except FileExistsError:
        pass
    except OSError as e:
        raise HpcimageError(f"cannot make the MPI state directory {base}: {e.strerror}"
                            + (" (HPCIMAGE_MPI_STATE)" if "HPCIMAGE_MPI_STATE" in os.environ
                               else "")) from None
    st = os.lstat(base)
    if st.st_uid != os.getuid() or not os.path.isdir(base) or os.path.islink(base):
        raise HpcimageError(f"{base}: not a directory owned by you; refusing to use it")
    return base


def state_name(key):
    """The state directory's name of job KEY on this node: KEY@NODENAME. The node's
    name keeps nodes apart where HPCIMAGE_MPI_STATE is on a shared file system (a pid
    in another node's holder file means nothing here); hpcimage-join forms the same."""
    return f"{key}@{os.uname().nodename}"


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


# In an env script, these words read variables indirectly or run other code: no probe.
INDIRECT = {".", "source", "eval", "printenv", "env", "set", "declare", "typeset", "compgen",
            "-p"}   # -p: export -p


def _scripts_look_static(varies, shell_env=None):
    """The image's env scripts name no per-rank variable (the planning environment may
    lack those, so the probe alone cannot see them being read) and read none
    indirectly. Comment lines are skipped. The base environment an hpcimage build
    writes (image.baseenv) is known: its 95-apps.sh sources an app's scripts only for
    an active app (APPTAINER_APPNAME in shell_env)."""
    names = FORWARD_PREFIXES + ("HFI_", "IPATH_")
    app = bool((shell_env or {}).get("APPTAINER_APPNAME"))
    try:
        files = sorted(f for f in os.listdir(ENV_DIR) if f.endswith(".sh"))
    except OSError:
        return False
    for f in files:
        try:
            with open(os.path.join(ENV_DIR, f), errors="replace") as fh:
                raw = fh.read()
        except OSError:
            return False
        if raw == ENV_FILES.get(f) and not (app and f == "95-apps.sh"):
            continue
        text = "\n".join(ln for ln in raw.splitlines() if not ln.lstrip().startswith("#"))
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
    from hpcimage.runtime.command import enter_workdir, script_shell   # loaded already
    if not os.access("/bin/sh", os.X_OK) or not _scripts_look_static(varies, shell_env):
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
                sh = script_shell()
                os.execve(sh, [sh, "-c", script, "hpcimage", "env", "-0"], env)
            finally:
                os._exit(127)
        os.close(w)
        out = sc.read_to_end(r)
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


def start_holder(head, state, refs_path, close_fds=(), warm=None, probe=None, idle=0,
                 leader=None, late_recipe=None, expected=0):
    """Fork the holder: it carries out head (up to pivot_root), runs the environment
    probe (probe: _probe_env's arguments), reports ready, warms the page cache for the
    program (warm: (command, PATH)), then waits until no rank holds `refs`, and exits.
    idle (warm starts, runtime.warm): it waits instead until no call has held `refs`
    nor joined for `idle` seconds, or the process `leader` (the caller's session
    leader, watched through a pidfd) has exited, or its state directory was retired.
    late_recipe (warm starts): the probe runs after the holder reports ready (the
    caller does not wait for it) and the holder writes late_recipe(its result) as the
    state's recipe (under the base's lock, while the state is still its own).
    expected (MPI: jobenv.local_tasks): the ranks the launcher starts on this node; the
    holder stays, once the ranks so far have exited, until that many have joined
    (`joins`, a byte per join) or none has joined for jobenv.GRACE seconds, so that a
    very short rank started late still finds the container.
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
            if idle or expected:        # after pivot_root the standard library is gone
                import select  # noqa: F401
                import time  # noqa: F401
                if leader is not None:
                    leader = os.pidfd_open(leader)
            if warm:                    # what _warm needs, imported while the host is seen
                from hpcimage.host import elf, ldcache  # noqa: F401
            # The state directory by descriptors, opened while the host's paths are
            # seen: after pivot_root they name the container's files (a state directory
            # outside /tmp, HPCIMAGE_MPI_STATE=/var/tmp/..., is not bound in it).
            base = os.path.dirname(state)
            parent_fd = _open_dir(os.path.dirname(base))
            base_fd = _open_dir(base)
            state_fd = _open_dir(state)
            fd = os.open(refs_path, os.O_RDONLY | os.O_CLOEXEC)
            joins = None
            if expected:
                try:
                    joins = os.open("joins", os.O_RDONLY | os.O_CLOEXEC, dir_fd=state_fd)
                except OSError:
                    joins = None
            try:
                execute(head)
            except HpcimageError as e:
                os.write(w, ("E" + e.message).encode())
                os._exit(1)
            os.dup2(null, 2)
            final = None
            if probe and late_recipe is None:
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
            if probe and late_recipe is not None:
                try:
                    _write_late(late_recipe, _probe_env(*probe), base_fd, state_fd,
                                os.path.basename(state))
                except Exception:               # noqa: BLE001  (only a speed-up)
                    pass
            if warm:
                try:
                    _warm(*warm)
                except Exception:               # noqa: BLE001  (only a speed-up)
                    pass
            if idle:
                if wait_idle(fd, base_fd, state_fd, os.path.basename(state), idle, leader):
                    remove_state(base_fd, os.path.basename(state), state_fd)
                    try:
                        os.rmdir(os.path.basename(base), dir_fd=parent_fd)
                    except OSError:
                        pass
                fcntl.flock(base_fd, fcntl.LOCK_UN)
                # No call joins now; one still running keeps the image mounted (the
                # mount's daemon lives while this process does) until it exits.
                fcntl.flock(fd, fcntl.LOCK_EX)
                os._exit(0)
            else:
                if joins is not None:
                    _wait_for_late_ranks(fd, joins, expected)
                fcntl.flock(fd, fcntl.LOCK_EX)         # every rank has exited
                fcntl.flock(base_fd, fcntl.LOCK_EX)
            remove_state(base_fd, os.path.basename(state), state_fd)
            try:        # the user's directory too, when this was its last job here
                os.rmdir(os.path.basename(base), dir_fd=parent_fd)
            except OSError:
                pass
        except BaseException:
            pass
        os._exit(0)
    os.close(w)
    msg = sc.read_to_end(r)
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


def wait_idle(refs, base_fd, state_fd, name, idle, leader=None):
    """The warm holder's wait (after pivot_root: descriptors only). Idle means no call
    holds `refs` (each joined call holds it shared until it exits) and none joined
    (a join touches refs' mtime) for `idle` seconds. Returns, holding the base's lock,
    True when the state is to be removed (idle, or the session leader -- its pidfd
    `leader` -- has exited), False when the state directory was retired meanwhile (a
    call found it made for another image or options, or stale)."""
    import select
    import time
    busy_at, busy = 0.0, False
    while True:
        now = time.time()
        if busy:
            due = now + min(idle, 1.0)
        else:
            try:
                joined = os.stat(refs).st_mtime
            except OSError:
                joined = 0.0
            due = max(joined, busy_at) + idle
        wait = min(max(0.0, due - now), 2.0)  # a retired holder goes within 2 s
        if leader is not None:
            if select.select([leader], [], [], wait)[0]:
                fcntl.flock(base_fd, fcntl.LOCK_EX)
                return _still_ours(base_fd, state_fd, name)
        else:
            time.sleep(wait)
        if not _still_ours(base_fd, state_fd, name):
            fcntl.flock(base_fd, fcntl.LOCK_EX)
            return False
        if time.time() < due:
            continue
        fcntl.flock(base_fd, fcntl.LOCK_EX)
        if not _still_ours(base_fd, state_fd, name):
            return False
        try:
            fcntl.flock(refs, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:                 # a call runs: look again in a second
            fcntl.flock(base_fd, fcntl.LOCK_UN)
            busy_at, busy = time.time(), True
            continue
        if busy:                        # the last call ended within the last second
            busy_at, busy = time.time(), False
        if time.time() - max(os.stat(refs).st_mtime, busy_at) >= idle:
            return True                 # base and refs locked: no call can join now
        fcntl.flock(refs, fcntl.LOCK_UN)
        fcntl.flock(base_fd, fcntl.LOCK_UN)


def _wait_for_late_ranks(refs, joins, expected):
    """The MPI holder's wait once the ranks so far have exited (it then holds `refs`
    exclusively): until `expected` ranks have joined (the size of `joins`) or none has
    for jobenv.GRACE seconds. Returns holding `refs` exclusively. Descriptors only
    (after pivot_root)."""
    import time
    from hpcimage.runtime.mpi.jobenv import GRACE
    while True:
        fcntl.flock(refs, fcntl.LOCK_EX)
        st = os.fstat(joins)
        if st.st_size >= expected or time.time() - st.st_mtime >= GRACE:
            return
        fcntl.flock(refs, fcntl.LOCK_UN)
        time.sleep(0.05)


def _count_join(state):
    """One more rank joined the container of state (a byte appended to `joins`)."""
    try:
        fd = os.open(os.path.join(state, "joins"),
                     os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError:
        return
    try:
        os.write(fd, b"j")
    finally:
        os.close(fd)


def _write_late(late_recipe, final, base_fd, state_fd, name):
    """The holder's recipe with the probe's result (descriptors only: after pivot_root)."""
    if final is None:
        return
    data = late_recipe(final)
    if not data:
        return
    fcntl.flock(base_fd, fcntl.LOCK_EX)
    try:
        if not _still_ours(base_fd, state_fd, name):
            return
        fd = os.open("recipe.tmp", os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC,
                     0o600, dir_fd=state_fd)
        try:
            while data:
                data = data[os.write(fd, data):]
        finally:
            os.close(fd)
        os.rename("recipe.tmp", "recipe", src_dir_fd=state_fd, dst_dir_fd=state_fd)
    finally:
        fcntl.flock(base_fd, fcntl.LOCK_UN)


def _still_ours(base_fd, state_fd, name):
    try:
        a = os.stat(name, dir_fd=base_fd, follow_symlinks=False)
        b = os.fstat(state_fd)
    except OSError:
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def _open_dir(path):
    return os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)


STATE_FILES = ("holder", "holder.tmp", "refs", "recipe", "recipe.tmp", "joins")


def remove_state(base_fd, key, state_fd=None):
    """Remove the state directory KEY of the directory base_fd (its files, then itself);
    errors are ignored (a file already gone)."""
    try:
        if state_fd is None:
            state_fd = os.open(key, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
                               | os.O_NOFOLLOW, dir_fd=base_fd)
        for name in os.listdir(state_fd):
            try:
                os.unlink(name, dir_fd=state_fd)
            except OSError:
                pass
        os.rmdir(key, dir_fd=base_fd)
    except OSError:
        pass


def sweep_dead(base_fd, keep):
    """Remove the state directories of holders that died without tearing down (killed
    by a signal: SIGKILL, OOM): no holder process, and no rank holding `refs`. Called
    under the base's lock by the first rank of a job on the node. keep: the job's own."""
    try:
        names = os.listdir(base_fd)
    except OSError:
        return
    for key in names:
        if key == keep:
            continue
        try:
            sfd = os.open(key, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC | os.O_NOFOLLOW,
                          dir_fd=base_fd)
        except OSError:
            continue
        try:
            try:
                with open(os.open("holder", os.O_RDONLY | os.O_CLOEXEC, dir_fd=sfd)) as f:
                    pid = int(f.read().strip() or 0)
            except (OSError, ValueError):
                pid = 0
            if pid and _alive(pid):
                continue
            try:
                refs = os.open("refs", os.O_RDONLY | os.O_CLOEXEC, dir_fd=sfd)
            except FileNotFoundError:
                refs = None
            except OSError:
                continue
            if refs is not None:
                try:
                    fcntl.flock(refs, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:         # a rank still runs: not ours to remove
                    os.close(refs)
                    continue
                os.close(refs)
            remove_state(base_fd, key, sfd)
        finally:
            os.close(sfd)


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
    digest = head_digest(head)
    base = state_base()
    name = state_name(key)
    state = os.path.join(base, name)
    refs_path = os.path.join(state, "refs")
    m = _locked_fd(locked, base)
    if m is None:
        m = os.open(base, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    for _attempt in range(50):
        other = False
        fcntl.flock(m, fcntl.LOCK_EX)
        if not _same_dir(m, base):      # the last holder removed it meanwhile
            fcntl.flock(m, fcntl.LOCK_UN)
            os.close(m)
            base = state_base()
            m = _open_dir(base)
            continue
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
                if pid and _alive(pid) and _read_head(state) not in (None, digest):
                    # This rank asks for another container (its own GPUs, binds or
                    # options): the job's container made for that, or a new one.
                    os.close(refs)
                    refs, other = None, True
                    name = state_name(f"{key}~{digest}")
                    state = os.path.join(base, name)
                    refs_path = os.path.join(state, "refs")
                elif not (pid and _alive(pid)):
                    sweep_dead(m, name)
                    if "~" in name:
                        os.write(2, b"image-mpi: note: this rank's container differs from "
                                 b"the one its job has on this node (other devices, binds "
                                 b"or options): it gets one of its own\n")
                    write_head(state, digest)
                    rec = None
                    if signature is not None:
                        try:
                            rec = Recipe(tail, environ, signature, os.getcwd(), cleanenv)
                        except OSError:
                            pass
                    open(os.path.join(state, "joins"), "w").close()
                    pid, final = start_holder(head, state, refs_path, (refs, m),
                                               warm_arg(tail),
                                               rec.probe_args() if rec and rec.ok else None,
                                               expected=local_tasks(environ or os.environ))
                    tmp = os.path.join(state, "holder.tmp")
                    with open(tmp, "w") as f:
                        f.write(str(pid))
                    os.rename(tmp, os.path.join(state, "holder"))
                    if rec is not None and rec.ok:    # the other ranks: hpcimage-join
                        rec.final = final
                        write_recipe(state, rec.encode())
                user_fd = os.open(f"/proc/{pid}/ns/user", os.O_RDONLY | os.O_CLOEXEC)
                mnt_fd = os.open(f"/proc/{pid}/ns/mnt", os.O_RDONLY | os.O_CLOEXEC)
                _count_join(state)
        finally:
            fcntl.flock(m, fcntl.LOCK_UN)
        if refs is None:
            if not other:
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


def head_digest(head):
    """A short name for what a container is made of: its plan's head (the ops up to
    pivot_root) as --dry-run describes them, hashed (BLAKE2b, 8 bytes, hex). Ranks of a
    job whose heads differ (CUDA_VISIBLE_DEVICES=$SLURM_LOCALID, other binds or options)
    must not share a container."""
    import _blake2
    text = "\n".join(line for op in head.ops for line in op.describe())
    return _blake2.blake2b(os.fsencode(text), digest_size=8).hexdigest()


def write_head(state, digest):
    """Record the digest of the container a state directory's holder keeps."""
    with open(os.path.join(state, "head"), "w") as f:
        f.write(digest)


def _read_head(state):
    try:
        with open(os.path.join(state, "head")) as f:
            return f.read().strip() or None
    except OSError:
        return None


def _same_dir(fd, path):
    """Is the directory open as fd still the one at path?"""
    try:
        a, b = os.fstat(fd), os.stat(path)
    except OSError:
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)
