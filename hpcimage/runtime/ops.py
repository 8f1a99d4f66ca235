"""The launch's operations: small typed objects with named fields, each self-contained
(absolute paths; the root, the image's mount point and a pinned source's fd are fields,
not the loop's variables), each with `describe()` (its `--dry-run` lines, words quoted
as sh would need them) and `run(state)` (what `execute` does for it).

    HostDirs      create the host directories behind -W/--workdir (mkdir -p)
    UserNs        unshare(user, mount; ipc, uts where asked) and map the caller's
                  uid/gid onto themselves; the hostname (--hostname)
    Private       make every mount private (nothing propagates to the host)
    Session       a tmpfs at the session directory: mount points and generated files
    MountImage    mount the image there (squashfuse) or bind the directory, read-only
    MountData     mount an image file bound as data (-B FILE:DST:image-src=PATH) there
    OverlayLayer  lock an overlay and mount it below the session directory (a directory
                  bound, ext3 with fuse2fs, SquashFS with squashfuse, a tmpfs)
    OverlayMount  the overlay of the image and its layers (kernel overlayfs with
                  userxattr, else fuse-overlayfs), with the bind targets the image lacks
                  in a layer of their own; the locks handed to a small holder process
    RootFs        the root: the image itself, or a tmpfs skeleton that mirrors the
                  image's entries with binds and adds the bind targets the image lacks
    IdentityFiles passwd and group: the image's, plus the user and the user's group
    Bind          host path -> container path (recursive; read-only where asked)
    Remount       the root mount read-only
    Pivot         pivot_root into the root and drop the host's tree
    Chdir         the working directory (else $HOME, else /, with a warning)
    Process       the command's umask (--no-umask) and PID namespace (--pid: a small
                  init is PID 1, or with --no-init the command)
    Exec          replace this process by the command (env scripts first via /bin/sh)

`name` is the step's word in `--dry-run` and in "launch step 'NAME' failed".
Standard library only: the hot path.
"""
import os

from hpcimage.linux import syscalls as sc
from hpcimage.runtime.command import RUNSCRIPT, TESTSCRIPT, enter_workdir, exec_command, app_dir
from hpcimage.runtime.environ import evaluated
from hpcimage.runtime.rootfs import build_root, write_identity_files, make_target, map_ids, remount_ro


_SAFE = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789@%+=:,./-_")


def quote(s):
    """shlex.quote(s) (without importing shlex and re on the hot path)."""
    if s and all(c in _SAFE for c in s):
        return s
    return "'" + s.replace("'", "'\"'\"'") + "'"


def _assign(k, v):
    """K=V as one sh word."""
    if k and all(c in _SAFE and c not in "=" for c in k):
        return f"{k}={quote(v)}"
    return quote(f"{k}={v}")


def _pinned(path, fd):
    """The path that reaches a pinned source (also from squashfuse, a child)."""
    return path if fd is None else f"/proc/{os.getpid()}/fd/{fd}"


class State:
    """What the launch produces while it runs: the squashfuse daemon's pid and those
    of the data images' and overlays' helpers (killed when a later step fails); the
    overlays' locked descriptors until a holder takes them."""
    __slots__ = ("mount_pid", "data_pids", "lock_fds")

    def __init__(self):
        self.mount_pid = None
        self.data_pids = []
        self.lock_fds = []


class Op:
    __slots__ = ()
    name = ""

    def describe(self):
        """The op's `--dry-run` lines."""
        return [self.name]

    def __repr__(self):
        fields = ", ".join(f"{k}={getattr(self, k)!r}" for k in self.__slots__)
        return f"{type(self).__name__}({fields})"

    def __eq__(self, other):
        return type(self) is type(other) and all(
            getattr(self, k) == getattr(other, k) for k in self.__slots__)

    __hash__ = None


class HostDirs(Op):
    """Host directories created (mkdir -p, mode 0750; tmp ones 01777) before the launch:
    what -W/--workdir holds (scratch, tmp, var_tmp, home)."""
    __slots__ = ("dirs", "tmp")
    name = "workdir"

    def __init__(self, dirs, tmp=()):
        self.dirs, self.tmp = list(dirs), list(tmp)

    def describe(self):
        return [f"workdir {' '.join(quote(d) for d in self.dirs + self.tmp)}  # mkdir -p"]

    def run(self, state):
        for d in self.dirs + self.tmp:
            os.makedirs(d, 0o750, exist_ok=True)
        for d in self.tmp:
            os.chmod(d, 0o1777)


class UserNs(Op):
    """The user and mount namespaces (root: the mount namespace only), with ipc and
    uts (bools) new IPC and UTS namespaces, hostname (or None) set in the latter.
    fakeroot: None (uid/gid map onto themselves), or the linux.idmap.IdMap of
    --fakeroot (uid/gid -> 0; "subid": the subordinate ranges -> 1..N, written by
    newuidmap/newgidmap from a helper forked before the unshare, which stays in the
    caller's namespace; "single": only uid/gid -> 0)."""
    __slots__ = ("uid", "gid", "ipc", "uts", "hostname", "fakeroot")
    name = "userns"

    def __init__(self, uid, gid, ipc=False, uts=False, hostname=None, fakeroot=None):
        self.uid, self.gid = uid, gid
        self.ipc, self.uts, self.hostname = ipc, uts or bool(hostname), hostname
        self.fakeroot = fakeroot

    def describe(self):
        more = (" ipc" if self.ipc else "") + (" uts" if self.uts else "")
        if self.fakeroot is not None:
            more += f" fakeroot  # {self.fakeroot.describe()}"
        if self.hostname:
            more += f"{'; ' if self.fakeroot is not None else '  # '}hostname {quote(self.hostname)}"
        return [f"userns {self.uid} {self.gid}{more}"]

    def run(self, state):
        more = (sc.CLONE_NEWIPC if self.ipc else 0) | (sc.CLONE_NEWUTS if self.uts else 0)
        if self.fakeroot is not None and self.uid != 0:
            _fakeroot_unshare(self.fakeroot, more)
        elif self.uid == 0:
            sc.unshare(sc.CLONE_NEWNS | more)
        else:
            sc.unshare(sc.CLONE_NEWUSER | sc.CLONE_NEWNS | more)
            map_ids(self.uid, self.gid)
        if self.hostname:
            sc.sethostname(self.hostname)


def _fakeroot_unshare(m, more):
    """unshare(user, mount, more) as root of the new user namespace, mapped as the
    IdMap m says (UserNs)."""
    from hpcimage.errors import HpcimageError
    from hpcimage.linux.idmap import write_maps
    flags = sc.CLONE_NEWUSER | sc.CLONE_NEWNS | more
    if m.mode != "subid":
        sc.unshare(flags)
        write_maps("self", m, "--fakeroot")
        return
    # newuidmap must run in the caller's namespace: a helper forked before the
    # unshare writes our maps once we have unshared, and says why where it cannot.
    parent = os.getpid()
    r_go, w_go = os.pipe()
    r_err, w_err = os.pipe()
    helper = os.fork()
    if helper == 0:
        code = 1
        try:
            os.close(w_go), os.close(r_err)
            if os.read(r_go, 1) == b"g":
                try:
                    write_maps(parent, m, "--fakeroot")
                    code = 0
                except HpcimageError as e:
                    os.write(w_err, e.message.encode()[:4000])
                except OSError as e:
                    os.write(w_err, f"--fakeroot: {e.strerror}".encode())
        finally:
            os._exit(code)
    os.close(r_go), os.close(w_err)
    try:
        try:
            sc.unshare(flags)
        finally:
            os.write(w_go, b"g")
            os.close(w_go)
    except BaseException:
        os.close(r_err)
        os.waitpid(helper, 0)
        raise
    msg = sc.read_to_end(r_err)
    st = os.waitpid(helper, 0)[1]
    if msg or st:
        raise HpcimageError(msg.decode(errors="replace") or "--fakeroot: the id maps "
                            "could not be written")
    os.setgroups([])


class Private(Op):
    __slots__ = ()
    name = "private"

    def describe(self):
        return ["private /"]

    def run(self, state):
        sc.mount(None, "/", None, sc.MS_REC | sc.MS_PRIVATE)


SESSION_SUBDIRS = ("image", "home", "tmp", "vartmp", "dev")


class Session(Op):
    """The session tmpfs at base, its directories; scratch: how many empty scratch
    directories (scratch/0, scratch/1, ...: -S without -W)."""
    __slots__ = ("base", "scratch")
    name = "session"

    def __init__(self, base, scratch=0):
        self.base, self.scratch = base, scratch

    def describe(self):
        return [f"session {quote(self.base)}"
                + (f"  # {self.scratch} scratch directories" if self.scratch else "")]

    def run(self, state):
        base = self.base
        sc.mount("hpcimage", base, "tmpfs", sc.MS_NOSUID | sc.MS_NODEV, "mode=0755")
        for d in SESSION_SUBDIRS:
            os.mkdir(f"{base}/{d}", 0o700)
        for d in ("tmp", "vartmp"):
            os.chmod(f"{base}/{d}", 0o1777)
        os.chmod(f"{base}/dev", 0o755)
        os.mkdir(f"{base}/dev/shm", 0o1777)
        os.chmod(f"{base}/dev/shm", 0o1777)
        os.mkdir(f"{base}/dev/pts")
        if self.scratch:
            os.mkdir(f"{base}/scratch", 0o755)
            for n in range(self.scratch):
                os.mkdir(f"{base}/scratch/{n}", 0o700)


class MountImage(Op):
    """image: an hpcimage.image.Image; fd: the image file opened by pin_sources (the
    session tmpfs hides its path), else None; writable: a sandbox bound read-write
    (--writable)."""
    __slots__ = ("image", "at", "fd", "writable")
    name = "image"

    def __init__(self, image, at, fd=None, writable=False):
        self.image, self.at, self.fd, self.writable = image, at, fd, writable

    def describe(self):
        image = self.image
        note = image.kind + (f", the squashfs partition at offset {image.offset}"
                             if getattr(image, "offset", 0) else "")
        if self.writable:
            note += ", read-write (--writable)"
        return [f"image {quote(image.path)} -> {quote(self.at)}  # {note}"]

    def run(self, state):
        image, at = self.image, self.at
        if self.fd is not None:
            image = type(image)(_pinned(image.path, self.fd), image.kind, image.offset,
                                image.size, image.arch)
        check_tree = image.arch in (None, "unknown")    # a SIF's header was checked
        if check_tree:
            # Imported before squashfuse is forked: an import after fork(2) pays a
            # copy-on-write fault for each page it touches (~5 times slower).
            from hpcimage.image import arch
        if image.needs_mount:
            from hpcimage.image import squashfs
            state.mount_pid = squashfs.mount(image, at, at + ".log")
        else:
            sc.mount(image.path, at, None, sc.MS_BIND | sc.MS_REC)
            if not self.writable:
                remount_ro(at)
        if check_tree:
            arch.check_tree(image.path, at)


class MountData(Op):
    """fs: an hpcimage.image.data.DataFs (an image file's SquashFS or ext3 file system),
    mounted at at (below the session directory), read-only where ro (SquashFS always);
    check: the path inside it that a bind takes (image-src), an error when missing;
    fd: the file opened by pin_sources, else None."""
    __slots__ = ("fs", "at", "ro", "check", "fd")
    name = "data"

    def __init__(self, fs, at, ro, check="/", fd=None):
        self.fs, self.at, self.ro, self.check, self.fd = fs, at, ro, check, fd

    def describe(self):
        fs = self.fs
        where = f", at offset {fs.offset}" if fs.offset else ""
        return [f"data {quote(fs.path)} -> {quote(self.at)}{' ro' if self.ro else ''}  # "
                f"{fs.kind}{where}, for image-src={quote(self.check)}"]

    def run(self, state):
        from hpcimage.errors import UsageError
        from hpcimage.image import data
        fs = self.fs
        if self.fd is not None:
            fs = data.DataFs(_pinned(fs.path, self.fd), fs.kind, fs.offset, fs.size)
        os.makedirs(self.at, exist_ok=True)
        state.data_pids.append(data.mount(fs, self.at, self.at + ".log", self.ro))
        if not os.path.lexists(self.at + self.check.rstrip("/")):
            raise UsageError(f"{self.fs.path}: image-src {self.check}: no such path in "
                             "the image")


class OverlayLayer(Op):
    """layer: an image.overlay.Layer, mounted at at (below the session directory):
    locked first (flock: exclusive when writable, shared when read-only; a directory
    or an ext3 image), its upper/ and work/ made when writable; prog: who warns;
    fd: the file opened by pin_sources, else None."""
    __slots__ = ("layer", "at", "prog", "fd")
    name = "layer"

    def __init__(self, layer, at, prog="hpcimage", fd=None):
        self.layer, self.at, self.prog, self.fd = layer, at, prog, fd

    def describe(self):
        x = self.layer
        src = "tmpfs" if x.path is None else quote(x.path)
        lock = "" if x.kind in ("tmpfs", "squashfs") else (
            ", locked (one writer)" if x.writable else ", locked (shared)")
        return [f"layer {src} -> {quote(self.at)}{'' if x.writable else ' ro'}  # "
                f"{x.describe()}{lock}"]

    def run(self, state):
        from hpcimage.runtime import overlay
        overlay.mount_layer(self.layer, self.at, _pinned(self.layer.path, self.fd)
                            if self.layer.path else None, self.prog, state)


class OverlayMount(Op):
    """The overlay at at: lowers (the layers' directories, top first: the read-only
    overlays, the image, then the points layer, lowest), upper and work (None: read-only);
    points: the directory of the bind targets the image lacks (created there, never
    in a user's layer); targets: [(container path, source)] of the binds; image_dir:
    the image's mount point (symbolic links are resolved there); driver: "auto",
    "kernel" or "fuse-overlayfs"."""
    __slots__ = ("at", "lowers", "upper", "work", "points", "targets", "image_dir",
                 "driver")
    name = "overlay"

    def __init__(self, at, lowers, upper, work, points, targets, image_dir, driver="auto"):
        self.at, self.lowers, self.upper, self.work = at, list(lowers), upper, work
        self.points, self.targets, self.image_dir = points, list(targets), image_dir
        self.driver = driver

    def describe(self):
        how = {"auto": "kernel overlayfs (userxattr), else fuse-overlayfs",
               "kernel": "kernel overlayfs (userxattr)",
               "fuse-overlayfs": "fuse-overlayfs"}[self.driver]
        words = ["lower=" + ":".join(quote(x) for x in self.lowers + [self.points])]
        if self.upper:
            words += [f"upper={quote(self.upper)}", f"work={quote(self.work)}"]
        return [f"overlay {' '.join(words)} -> {quote(self.at)}  # {how}; "
                "the bind targets the image lacks in the lowest layer"]

    def run(self, state):
        from hpcimage.runtime import overlay
        overlay.mount_union(self, state)


class RootFs(Op):
    """The root (runtime.rootfs.build_root); in_image: a sandbox under --writable, its
    missing mount points made in the sandbox itself (never a skeleton over it)."""
    __slots__ = ("image_dir", "root", "targets", "in_image")
    name = "rootfs"

    def __init__(self, image_dir, root, targets, in_image=False):
        self.image_dir, self.root, self.targets = image_dir, root, targets
        self.in_image = in_image

    def describe(self):
        return [f"rootfs {quote(self.image_dir)} -> {quote(self.root)}  # mount points"
                + (" (made in the sandbox where missing)" if self.in_image else "") + ": "
                + " ".join(quote(t) for t in self.targets)]

    def run(self, state):
        build_root(self.image_dir, self.root, self.targets, self.in_image)


class IdentityFiles(Op):
    """passwd and group written to base (the session directory) from the image's (read
    below image_root) plus the user and the user's group."""
    __slots__ = ("base", "image_root", "uid", "gid", "user", "home", "gecos", "shell",
                 "group")
    name = "files"

    def __init__(self, base, image_root, uid, gid, user, home, gecos, shell, group):
        self.base, self.image_root = base, image_root
        self.uid, self.gid, self.user, self.home = uid, gid, user, home
        self.gecos, self.shell, self.group = gecos, shell, group

    def describe(self):
        return [f"files {quote(self.base + '/passwd')} {quote(self.base + '/group')}  # the "
                f"image's, plus user {quote(self.user)} ({self.uid}:{self.gid}, home "
                f"{quote(self.home)}, shell {quote(self.shell or '/bin/sh')}) and group "
                f"{quote(self.group)}"]

    def run(self, state):
        write_identity_files(self.base, self.image_root, self.uid, self.gid, self.user, self.home,
               self.gecos, self.shell, self.group)


class Bind(Op):
    """src (host) -> dst (container) below root; what: why, for --dry-run. src may be
    "session:NAME" until plan() resolves it to the session directory's NAME. fd: src
    opened by pin_sources (the session tmpfs hides its path), else None."""
    __slots__ = ("src", "dst", "ro", "what", "root", "fd")
    name = "bind"

    def __init__(self, src, dst, ro=False, what="bind", root=None, fd=None):
        self.src, self.dst, self.ro, self.what = src, dst, ro, what
        self.root, self.fd = root, fd

    def __str__(self):
        return (f"bind {quote(self.src)} -> {quote(self.dst)}{' ro' if self.ro else ''}"
                f"  # {self.what}")

    def describe(self):
        return [str(self)]

    def run(self, state):
        src = _pinned(self.src, self.fd)
        target = make_target(self.root, self.dst, os.path.isdir(src))
        sc.mount(src, target, None, sc.MS_BIND | sc.MS_REC)
        if self.ro:
            remount_ro(target)


class Remount(Op):
    """The mount at path (the root) read-only."""
    __slots__ = ("path",)
    name = "readonly"

    def __init__(self, path):
        self.path = path

    def describe(self):
        return [f"readonly {quote(self.path)}"]

    def run(self, state):
        remount_ro(self.path)


class Pivot(Op):
    __slots__ = ("root",)
    name = "pivot"

    def __init__(self, root):
        self.root = root

    def describe(self):
        return [f"pivot {quote(self.root)}"]

    def run(self, state):
        os.chdir(self.root)
        sc.pivot_root(".", ".")
        sc.umount2(".", sc.MNT_DETACH)
        os.chdir("/")


class Chdir(Op):
    """workdir, else home, else /. explicit: --pwd (an error where workdir is missing);
    note "system": workdir is the caller's, a system directory not bound (the image's
    own). prog: who says the warnings (None: silent)."""
    __slots__ = ("workdir", "home", "explicit", "note", "prog")
    name = "chdir"

    def __init__(self, workdir, home, explicit=False, note=None, prog=None):
        self.workdir, self.home, self.explicit = workdir, home, explicit
        self.note, self.prog = note, prog

    def describe(self):
        return [f"chdir {quote(self.workdir)}  # "
                + ("--pwd: an error where the container lacks it" if self.explicit
                   else ("the image's own (a system directory is not bound), "
                         if self.note == "system" else "")
                   + f"else {quote(self.home)}, else /")]

    def run(self, state):
        enter_workdir(self.workdir, self.home, self.explicit, self.note, prog=self.prog)


class Process(Op):
    """What the command's process gets besides its environment: umask (--no-umask:
    0o022; None: the caller's); pid (--pid): a new PID namespace, /proc its own, with a
    small init as PID 1 that forwards signals and reaps (init; --no-init: the command is
    PID 1). The launcher stays outside, forwarding signals and giving the exit status
    (128+N for a signal)."""
    __slots__ = ("umask", "pid", "init")
    name = "process"

    def __init__(self, umask=None, pid=False, init=True):
        self.umask, self.pid, self.init = umask, pid, init
        if pid:     # now: run() is after the pivot, where the package is out of reach
            from hpcimage.runtime import pidns  # noqa: F401

    def describe(self):
        words = []
        if self.umask is not None:
            words.append(f"umask {self.umask:04o}")
        if self.pid:
            words.append("pidns " + ("init" if self.init else "no-init")
                         + "  # fresh /proc; PID 1: "
                         + ("a small init, the command below it" if self.init
                            else "the command"))
        return ["process " + "; ".join(words)]

    def run(self, state):
        if self.umask is not None:
            os.umask(self.umask)
        if self.pid:
            from hpcimage.runtime import pidns
            pidns.enter(self.init)


class Exec(Op):
    """verb (exec, run, shell) with argv; env: the container's environment before the
    env scripts; forced, prepend, append: what is set after them; app: the SCI-F app
    or None; rcfile: bash's --rcfile for shell (Lmod inside), or None."""
    __slots__ = ("verb", "argv", "env", "forced", "prepend", "append", "prog", "app",
                 "rcfile", "late")
    name = "exec"

    def __init__(self, verb, argv, env, forced, prepend, append, prog, app=None,
                 rcfile=None, late=None):
        self.verb, self.argv, self.env, self.forced = verb, argv, env, forced
        self.prepend, self.append, self.prog = prepend, append, prog
        self.app, self.rcfile, self.late = app, rcfile, late

    def describe(self):
        verb, argv, env, app, rc = self.verb, self.argv, self.env, self.app, self.rcfile
        note = "after /.singularity.d/env/*.sh when the image has them" + (
            f", then {app_dir(app)}/env/*.sh" if app else "")
        if verb == "run":
            argv = [(app_dir(app) + "/runscript") if app else RUNSCRIPT] + list(argv)
        elif verb == "test":
            argv = [(app_dir(app) + "/test") if app else TESTSCRIPT] + list(argv)
        elif verb == "shell":
            sh = env.get("APPTAINER_SHELL") or env.get("SINGULARITY_SHELL")
            opt = ["--rcfile", rc] if rc else ["--norc"]
            if sh:
                argv = [sh] + (opt if sh.endswith("/bash") else []) + list(argv)
            else:
                argv = ["/bin/bash"] + opt + list(argv)
                note += "; /bin/sh where the image has no /bin/bash"
        lines = [f"exec {' '.join(quote(a) for a in argv)}  # {note}"]
        for k in sorted(env):
            lines.append(f"  env {_assign(k, env[k])}")
        late = self.late
        if late is not None and late.envfile is not None:
            how = "evaluated" if late.evaluate else "literal values"
            lines.append(f"  env-file {quote(late.envfile)}  # {how}, after the env scripts")
        for k in sorted(self.forced):
            how = "evaluated, " if evaluated(self.forced[k], late) else ""
            lines.append(f"  env {_assign(k, self.forced[k])}  # forced, {how}after the env "
                         "scripts")
        if self.prepend is not None:
            lines.append(f"  prepend PATH {quote(self.prepend)}  # after the env scripts")
        if self.append is not None:
            lines.append(f"  append PATH {quote(self.append)}  # after the env scripts")
        for k in sorted(late.inject if late is not None else ()):
            lines.append(f"  merge {k} {quote(':'.join(late.inject[k]))}  # last, at its end")
        return lines

    def run(self, state):
        exec_command(self.verb, self.argv, self.env, self.forced, self.prepend, self.append,
              self.prog, self.app, self.rcfile, self.late)


# The session directory's own names: sources there are the launch's, not the user's.
SESSION_NAMES = ("image", "home", "tmp", "vartmp", "dev", "passwd", "group", "root",
                 "image.log", "data-images", "scratch", "crypt", "layers", "overlay")


def pin_sources(ops):
    """Host paths below the session directory (a fallback such as /mnt may hold the
    user's data) disappear under the session tmpfs: open them first. Returns the ops
    with each such Bind and MountImage replaced by a copy carrying the fd (run reaches
    the source as /proc/PID/fd/N, still valid for mount(2) and for squashfuse started
    from here); the others as they are. `execute` runs it when it reaches the Session
    op (the fds must belong to the launch's mount namespace). Raises OSError."""
    base = next((op.base for op in ops if type(op) is Session), None)
    if base is None:
        return list(ops)
    prefix = base.rstrip("/") + "/"
    own = tuple(prefix + n for n in SESSION_NAMES)

    def pin(path):
        if not path.startswith(prefix) or path.startswith(own):
            return None
        flags = os.O_PATH if os.path.isdir(path) else os.O_RDONLY   # squashfuse reads it
        return os.open(path, flags | os.O_CLOEXEC)
    out = []
    for op in ops:
        t = type(op)
        if t is Bind and op.fd is None:
            fd = pin(op.src)
            if fd is not None:
                op = Bind(op.src, op.dst, op.ro, op.what, op.root, fd)
        elif t is MountImage and op.fd is None:
            fd = pin(op.image.path)
            if fd is not None:
                op = MountImage(op.image, op.at, fd, op.writable)
        elif t is OverlayLayer and op.fd is None and op.layer.path:
            fd = pin(op.layer.path)
            if fd is not None:
                op = OverlayLayer(op.layer, op.at, op.prog, fd)
        elif t is MountData and op.fd is None:
            fd = pin(op.fs.path)
            if fd is not None:
                op = MountData(op.fs, op.at, op.ro, op.check, fd)
        out.append(op)
    return out
