"""Warm starts (site.yaml `warm: SECONDS`, docs/warm.md): the first `image-exec` of a
user and an image in a session leaves its container standing -- a holder process, as
an MPI job's per-node container (runtime.mpi.shared) -- for SECONDS of idle time; a
later call of the same user, image, options, directory and environment joins it
through hpcimage-join (mpi/join.c) without Python, or through this module when only
the joiner's exact checks differ but the container is the same.

The container's slot is STATE_BASE/warm-HASH@NODE, HASH = FNV-1a 64 of the image as
the module names it ($HPCIMAGE_IMAGE), the session id and $SLURM_JOB_ID (join.c forms
the same). What is in it must be proved the same before a call joins:
  - the image files: (dev, ino, size, mtime_ns) of the file mounted, of $HPCIMAGE_IMAGE
    and of its store manifest (image-update, republish);
  - the plan's head (shared.head_digest: every op up to pivot_root);
  - the holder's namespaces (their inodes, against a reused pid).
Standard library only; imported only where the site turns warm starts on.
"""
import fcntl
import os

from hpcimage.errors import HpcimageError
from hpcimage.runtime.mpi import shared

# Options a warm container may be made with: each is part of the head (proved equal
# by its digest) or of the recipe (the joiner compares the option words). Any other
# option set (--contain's fresh /tmp, --writable-tmpfs, --pid, --env-file read once,
# options added later) gives a container of the call's own: cold.
ALLOWED = ("verb", "prog", "image", "args", "binds", "cleanenv", "no_home", "home",
           "pwd", "env", "no_eval", "no_mount", "nv", "rocm", "ib", "dry_run", "warnings",
           "mpi_mode", "given")
PREFIX = "warm-"


def seconds(site, environ):
    """The site's idle time (site.json "warm"), 0 when off (or HPCIMAGE_WARM=0)."""
    if environ.get("HPCIMAGE_WARM") == "0":
        return 0
    try:
        return max(0, int(getattr(site, "warm", 0) or 0))
    except (TypeError, ValueError):
        return 0


def fnv64(data):
    """FNV-1a, 64 bits (join.c's fnv64)."""
    h = 0xcbf29ce484222325
    for b in data:
        h = ((h ^ b) * 0x100000001b3) & 0xFFFFFFFFFFFFFFFF
    return h


def slot(environ):
    """The state directory's name of this user's, session's and job's warm container
    of the module's image on this node."""
    key = "\x1f".join((environ.get("HPCIMAGE_IMAGE", ""), str(os.getsid(0)),
                       environ.get("SLURM_JOB_ID", "")))
    return f"{PREFIX}{fnv64(os.fsencode(key)):016x}@{os.uname().nodename}"


def identity(r, environ):
    """[(absolute path, "dev:ino:size:mtime_ns" or "-")]: the files whose change means
    another image (join.c compares each with stat(2))."""
    paths = [r.image.path]
    mod = environ.get("HPCIMAGE_IMAGE")
    if mod:
        paths += [mod, os.path.join(os.path.dirname(mod) or ".", "hpcimage-manifest.json")]
    out = []
    for p in dict.fromkeys(os.path.abspath(p) for p in paths):
        try:
            st = os.stat(p)
            out.append((p, f"{st.st_dev}:{st.st_ino}:{st.st_size}:{st.st_mtime_ns}"))
        except OSError:
            out.append((p, "-"))
    return out


def why_cold(r, p, environ):
    """Why this call cannot use a warm container (a phrase), or None."""
    from hpcimage.runtime.mpi.jobenv import is_rank
    from hpcimage.runtime.ops import Chdir, Exec
    from hpcimage.runtime.options import Options
    o = r.opts
    if o.prog != "image-exec" or o.verb != "exec":
        return "only image-exec starts warm"
    if is_rank(environ):
        return "an MPI rank or Slurm step (image-mpi shares its containers)"
    if r.image.kind == "sandbox":
        return "a directory image (nothing to mount; its files can change unseen)"
    default = Options(o.verb, o.prog)
    for name in Options.__slots__:
        if name not in ALLOWED and getattr(o, name) != getattr(default, name):
            return f"--{name.replace('_', '-')} gives each call its own container"
    kinds = [type(op) for op in p.ops]
    if Chdir not in kinds or kinds[kinds.index(Chdir):] != [Chdir, Exec]:
        return "the command needs more than chdir and exec in the container"
    if not owner(environ):
        return "this session's leader has exited (nothing to end the container with)"
    return None


def _stat(pid):
    """(comm, ppid) of a process, or None."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
        return stat[stat.index("(") + 1:stat.rindex(")")], int(stat[stat.rindex(")") + 2:].split()[1])
    except (OSError, ValueError, IndexError):
        return None


def owner(environ):
    """The process whose end ends the warm container: in a Slurm job (SLURM_JOB_ID), the
    job's slurmstepd above this call (a batch script's session leader is gone: Slurm
    starts it from a short-lived child); else the session leader. 0: none alive."""
    if environ.get("SLURM_JOB_ID"):
        pid = os.getppid()
        for _ in range(64):
            st = _stat(pid)
            if st is None or pid <= 1:
                break
            if st[0] == "slurmstepd":
                return pid
            pid = st[1]
    sid = os.getsid(0)
    return sid if sid > 0 and shared._alive(sid) else 0


def signature(argv, opts):
    """The option words of `image-exec [OPTIONS] [--] COMMAND` as join.c reads them
    ("image-exec" and the words the parser took), or None."""
    rest = list(argv[1:])
    n = len(rest) - len(opts.args)
    if n < 0 or rest[n:] != list(opts.args) or any("\x1f" in a for a in argv):
        return None
    return "".join(a + "\x1f" for a in ["image-exec", *rest[:n]])


def _read(state, name):
    try:
        with open(os.path.join(state, name)) as f:
            return f.read().strip()
    except OSError:
        return None


def _ns_ids(pid):
    """"DEV:INO DEV:INO" of the holder's mount and user namespaces, or None."""
    try:
        m, u = os.stat(f"/proc/{pid}/ns/mnt"), os.stat(f"/proc/{pid}/ns/user")
    except OSError:
        return None
    return f"{m.st_dev}:{m.st_ino} {u.st_dev}:{u.st_ino}"


def _ident_text(ident):
    return "\n".join(f"{p}\x1f{v}" for p, v in ident)


def _live(state, digest, ident):
    """The holder's pid when the container in state is alive and the one this call
    asks for (same head, same image files, the recorded namespaces), else 0; and
    whether a holder runs at all."""
    pid = shared._read_pid(os.path.join(state, "holder"))
    if not pid or not shared._alive(pid):
        return 0, False
    ns = _read(state, "ns")
    if not ns or ns != _ns_ids(pid):
        return 0, False             # the pid was reused: not our holder
    same = _read(state, "head") == digest and _read(state, "ident") == _ident_text(ident)
    return (pid if same else 0), True


def describe(r, p, environ, site):
    """--dry-run's line: whether this call will join a warm container."""
    secs = seconds(site, environ)
    if not secs:
        return "# warm start: off (site.yaml warm, or HPCIMAGE_WARM=0)\n"
    why = why_cold(r, p, environ)
    if why:
        return f"# warm start: no, cold: {why}\n"
    from hpcimage.runtime import plan as launch
    from hpcimage.runtime.ops import Chdir
    head, _tail = launch.split(p, Chdir)
    try:
        state = os.path.join(shared.state_base(), slot(environ))
    except HpcimageError as e:
        return f"# warm start: no, cold: {e.message}\n"
    pid, running = _live(state, shared.head_digest(head), identity(r, environ))
    if pid:
        return f"# warm start: yes, joins the warm container of holder {pid}\n"
    return ("# warm start: no, cold: " + ("its warm container was made for another image "
            "or options: replaced by this call's" if running else "no warm container")
            + f"; this call's stays standing {secs} s idle\n")


def launch(r, p, environ, sig, secs):
    """Join this call's warm container, or set one up and leave it standing (the
    holder); returns the plan's tail (chdir, exec) to carry out in it. None: the state
    directory is not usable (said on stderr), the caller goes cold."""
    from hpcimage.runtime import plan as launch_plan
    from hpcimage.runtime.mpi.recipe import Recipe, write_recipe
    from hpcimage.runtime.ops import Chdir
    head, tail = launch_plan.split(p, Chdir)
    digest = shared.head_digest(head)
    ident = identity(r, environ)
    try:
        base = shared.state_base()
        st = os.lstat(base)
        if st.st_mode & 0o077:
            raise HpcimageError(f"{base}: open to other users (mode {st.st_mode & 0o777:04o}); "
                                "refusing to use it")
    except HpcimageError as e:
        os.write(2, f"image-exec: warning: no warm start: {e.message}\n".encode())
        return None
    name = slot(environ)
    state = os.path.join(base, name)
    refs_path = os.path.join(state, "refs")
    m = None
    for _attempt in range(50):
        if m is None:
            m = os.open(shared.state_base(), os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        fcntl.flock(m, fcntl.LOCK_EX)
        refs = None
        try:
            if not shared._same_dir(m, base):       # removed by a last holder meanwhile
                os.close(m)
                m = None
                continue
            pid, running = _live(state, digest, ident)
            if not pid and os.path.lexists(state):
                shared.remove_state(m, name)          # stale, or retired: made anew
            if not os.path.isdir(state):
                os.mkdir(state, 0o700)
            refs = os.open(refs_path, os.O_RDONLY | os.O_CREAT, 0o600)
            os.set_inheritable(refs, True)            # held by the command until it exits
            try:
                fcntl.flock(refs, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:                   # the holder is tearing down
                os.close(refs)
                fcntl.flock(m, fcntl.LOCK_UN)
                import time
                time.sleep(0.05)
                continue
            rec = Recipe(tail, environ, sig, os.getcwd(), error_label="image-exec", vary=())
            if not pid:
                shared.sweep_dead(m, name)
                shared.write_head(state, digest)
                with open(os.path.join(state, "ident"), "w") as f:
                    f.write(_ident_text(ident))
                rec.extra = [("ident", f"{p}\x1f{v}") for p, v in ident]

                def late(final):            # in the holder, in the container
                    ns = _ns_ids("self")
                    if sig is None or not rec.ok or not ns:
                        return None
                    rec.final = final
                    rec.extra += [("mntns", ns.split()[0]), ("userns", ns.split()[1])]
                    return rec.encode()
                try:
                    pid, _final = shared.start_holder(
                        head, state, refs_path, (refs, m), shared.warm_arg(tail),
                        rec.probe_args() if rec.ok else None, idle=secs,
                        leader=owner(environ), late_recipe=late)
                except HpcimageError:
                    shared.remove_state(m, name)
                    raise
                tmp = os.path.join(state, "holder.tmp")
                with open(tmp, "w") as f:
                    f.write(str(pid))
                os.rename(tmp, os.path.join(state, "holder"))
                with open(os.path.join(state, "ns"), "w") as f:
                    f.write(_ns_ids(pid) or "")
            os.utime(refs)                            # joined now (the holder's idle clock)
            ns = _ns_ids(pid)
            rec.extra = [("ident", f"{p}\x1f{v}") for p, v in ident]
            rec.extra += [("mntns", ns.split()[0]), ("userns", ns.split()[1])]
            if sig is not None and rec.ok:            # the next calls: hpcimage-join
                write_recipe(state, rec.encode())
            user_fd = os.open(f"/proc/{pid}/ns/user", os.O_RDONLY | os.O_CLOEXEC)
            mnt_fd = os.open(f"/proc/{pid}/ns/mnt", os.O_RDONLY | os.O_CLOEXEC)
        finally:
            if m is not None:
                fcntl.flock(m, fcntl.LOCK_UN)
        break
    else:
        if m is not None:
            os.close(m)
        raise HpcimageError("could not join or set up the warm container")
    os.close(m)
    from hpcimage.linux import syscalls as sc
    if os.getuid() != 0:
        sc.setns(user_fd, sc.CLONE_NEWUSER)
    sc.setns(mnt_fd, sc.CLONE_NEWNS)
    os.close(user_fd)
    os.close(mnt_fd)
    os.chdir("/")
    return tail
