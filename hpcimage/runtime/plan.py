"""The launch: a plan of typed operations (runtime.ops), then one loop that carries
them out (runtime.execute).

    UserNs, Private, Session, MountImage, RootFs, IdentityFiles, Bind..., Remount,
    Pivot, Chdir, Exec

`plan()` only reads; `Plan.describe()` prints the list (`--dry-run`); `execute()` runs it.
After `exec` no hpcimage process remains except, for SquashFS and SIF images, the
squashfuse daemon that the kernel kills when the command exits (PR_SET_PDEATHSIG).
Standard library only: this is the hot path.
"""
import os
import pwd
import grp

from hpcimage.errors import HpcimageError, UsageError
from hpcimage.runtime import environ
from hpcimage.runtime.command import _rank0, label, valid_app
from hpcimage.runtime.ops import (Bind, Chdir, Exec, IdentityFiles, MountImage, Pivot,
                                  Private, Remount, RootFs, Session, UserNs,
                                  quote)  # noqa: F401  (quote: for callers)


SESSION_DIRS = ("/var/lib/hpcimage/mnt", "/mnt", "/srv", "/media", "/opt")


# A current directory that is one of these (or directly below /usr, /usr/local or
# /usr/lib*) is not bound: the host's would replace what the image's system needs
# (Apptainer's addCwdMount list, with the merged-/usr names). Any other directory is
# bound at its path, below a system directory too (/usr/local/src/proj); /proc, /sys
# and /dev are the host's already (or a private /dev).
CWD_NOT_BOUND = ("/", "/bin", "/boot", "/etc", "/lib", "/lib32", "/lib64", "/libx32", "/mnt",
                 "/opt", "/run", "/sbin", "/usr", "/var", "/var/lib")


CWD_NOT_BOUND_BELOW = ("/usr", "/usr/local", "/usr/lib", "/usr/lib32", "/usr/lib64",
                       "/usr/libx32")


class Plan:
    def __init__(self):
        self.ops = []          # runtime.ops objects, in order
        self.warnings = []     # said once, before the launch
        self.notes = []        # what the steps found, skipped and why (--dry-run)

    def add(self, op):
        self.ops.append(op)

    def warn(self, prog, environ):
        """Say the plan's warnings on stderr (MPI: rank 0 only)."""
        if _rank0(environ):
            for w in self.warnings:
                os.write(2, f"{label(prog)}: warning: {w}\n".encode())

    def describe(self):
        """The plan as `--dry-run` prints it: the warnings and the steps' notes (host
        discovery's: what was found, what was skipped and why) as `# ` lines, then one
        op a line, its words quoted as sh would need them (`shlex.split(line,
        comments=True)` gives them back), then `  # ` and a note in words."""
        out = [f"# warning: {w}" for w in self.warnings]
        out += [f"# note: {n}" for n in self.notes]
        for op in self.ops:
            out += op.describe()
        return "\n".join(out) + "\n"

def parse_bind(spec, what="-B"):
    parts = spec.split(":")
    if len(parts) > 3 or not parts[0]:
        raise UsageError(f"bind {spec!r}: want SRC[:DST[:ro|rw]]")
    src = parts[0]
    dst = parts[1] if len(parts) > 1 and parts[1] else src
    mode = parts[2] if len(parts) > 2 else "rw"
    if mode not in ("ro", "rw"):
        raise UsageError(f"bind {spec!r}: mode must be ro or rw, not {mode!r}")
    src = os.path.abspath(src)
    if not dst.startswith("/"):
        raise UsageError(f"bind {spec!r}: destination must be an absolute path")
    return Bind(src, os.path.normpath(dst), mode == "ro", what)


def _user():
    uid, gid = os.getuid(), os.getgid()
    try:
        pw = pwd.getpwuid(uid)
        name, home, gecos, shell = pw.pw_name, pw.pw_dir, pw.pw_gecos, pw.pw_shell
    except KeyError:
        name = os.environ.get("USER") or f"user{uid}"
        home, gecos, shell = os.environ.get("HOME") or "/", "", "/bin/sh"
    try:
        group = grp.getgrgid(gid).gr_name
    except KeyError:
        group = name
    return uid, gid, name, home, gecos, shell, group


def _session_dir():
    d = os.environ.get("HPCIMAGE_SESSION_DIR")
    if d:
        return d
    for d in SESSION_DIRS:
        if os.path.isdir(d):
            return d
    raise HpcimageError("no directory to hold the session mounts: create /var/lib/hpcimage/mnt")


def _under(path, top):
    return path == top or path.startswith(top.rstrip("/") + "/")


def _covered(path, binds):
    """path is below a host directory bound at its own path."""
    return any(b.src == b.dst and _under(path, b.dst) for b in binds
               if not b.src.startswith("session:"))


def _system_dir(path):
    return path in CWD_NOT_BOUND or os.path.dirname(path) in CWD_NOT_BOUND_BELOW


def _cwd():
    """(the current directory, None), or (None, its name) when it was deleted."""
    try:
        return os.getcwd(), None
    except OSError:
        pass
    try:
        name = os.readlink("/proc/self/cwd")
    except OSError:
        name = ""
    if name.endswith(" (deleted)"):
        name = name[:-len(" (deleted)")]
    return None, name or "the current directory"


BIND_ENV = ("SINGULARITY_BIND", "APPTAINER_BIND", "HPCIMAGE_BIND")


def plan(opts, image, site=None, host_env=None, extra_binds=(), keep_prefixes=(),
         contributions=()):
    """Build the launch plan for opts (runtime.options.Options) and image (image.Image).

    extra_binds: host directories bound at the same path (e.g. the PMIx server's);
    keep_prefixes: variables that pass even under --cleanenv (MPI, PMIx, Slurm);
    contributions: host.Contribution objects (GPU, InfiniBand, MPI bind model)."""
    host_env = dict(os.environ if host_env is None else host_env)
    site = site or {}
    uid, gid, user, pw_home, gecos, pw_shell, group = _user()
    home = host_env.get("HOME") or pw_home
    p = Plan()
    base = _session_dir()
    root = base + "/root"
    image_root = base + "/image"
    p.add(UserNs(uid, gid))
    p.add(Private())
    p.add(Session(base))
    p.add(MountImage(image, image_root))

    # Host devices and driver libraries (GPU, InfiniBand): hpcimage.host reads the
    # host through one root (HPCIMAGE_HOST_ROOT), binds nothing where nothing is found.
    from hpcimage import host as hostmod
    hw = hostmod.discover(site, host_env, nv=opts.nv, rocm=opts.rocm, ib=opts.ib)
    contributions = [hw] + list(contributions)
    lmod_rc = None
    if isinstance(site.get("lmod"), dict):
        # site.yaml lmod_in_image: the host's Lmod, its Lua and MODULEPATH (imported
        # only here: the plain image-exec path stays light).
        from hpcimage.host import lmod
        config = host_env.get("HPCIMAGE_SITE_CONFIG")
        lc = lmod.discover(site["lmod"], host_env,
                           site_dir=os.path.dirname(config) if config else None)
        contributions.append(lc)
        keep_prefixes = tuple(keep_prefixes) + lmod.CLEANENV_KEEP_PREFIXES
        lmod_rc = lc.env.get("BASH_ENV")
    p.warnings = [w for c in contributions for w in c.warnings]
    p.notes = list(dict.fromkeys(n for c in contributions for n in c.notes))
    dev_binds = [b for b in hw.binds if b[1] == "/dev" or b[1].startswith("/dev/")]
    hw.binds = [b for b in hw.binds if b not in dev_binds]
    # A private /dev when the host's cannot simply be bound: --contain, GPUs left out
    # by *_VISIBLE_DEVICES, or a host root that is not this machine's /.
    private_dev = opts.contain or (dev_binds and (hw.hide or not hostmod.HostRoot(
        environ=host_env).is_real))

    binds = []
    for src in ("/proc", "/sys", "/dev"):
        if private_dev and src == "/dev":
            continue
        binds.append(Bind(src, src, False, "system"))
    if private_dev:
        why = "--contain: minimal /dev" if opts.contain else "minimal /dev + selected devices"
        binds.append(Bind("session:dev", "/dev", False, why))
        for d in ("null", "zero", "full", "random", "urandom", "tty"):
            if os.path.exists("/dev/" + d):
                binds.append(Bind("/dev/" + d, "/dev/" + d, False, why))
        if os.path.isdir("/dev/pts"):
            binds.append(Bind("/dev/pts", "/dev/pts", False, why))
        if not opts.contain and os.path.isdir("/dev/shm"):
            binds.append(Bind("/dev/shm", "/dev/shm", False, why))
        for src, dst, ro, w in dev_binds:
            binds.append(Bind(src, dst, False, w))
    if opts.contain:
        binds.append(Bind("session:tmp", "/tmp", False, "--contain: fresh /tmp"))
        binds.append(Bind("session:vartmp", "/var/tmp", False, "--contain: fresh /var/tmp"))
    else:
        binds.append(Bind("/tmp", "/tmp", False, "system"))
    for f in ("/etc/hosts", "/etc/resolv.conf"):
        if os.path.exists(f):
            binds.append(Bind(os.path.realpath(f), f, True, "host network files"))
    binds.append(Bind("session:passwd", "/etc/passwd", True, "image passwd + the user"))
    binds.append(Bind("session:group", "/etc/group", True, "image group + the user's group"))
    if opts.contain:
        binds.append(Bind("session:home", home, False, "--contain: empty home"))
    elif not opts.no_home and home != "/" and os.path.isdir(home):
        binds.append(Bind(home, home, False, "home"))
    module = host_env.get("HPCIMAGE_MODULE")
    for spec in list(site.get("binds", ())) + list(site.get("image_binds", {}).get(module or "", ())):
        b = parse_bind(spec, "site")
        if os.path.exists(b.src):
            binds.append(b)
    user_specs = []
    for var in BIND_ENV:
        user_specs += [v for v in host_env.get(var, "").split(",") if v]
    for spec in user_specs + list(opts.binds):
        b = parse_bind(spec, "-B")
        if not os.path.exists(b.src):
            raise UsageError(f"{opts.prog}: bind source {b.src} does not exist")
        binds.append(b)

    for d in extra_binds:
        if not any(_under(d, b.dst) for b in binds if b.src == b.dst):
            binds.append(Bind(d, d, False, "MPI/PMIx"))
    env_set, env_prepend = {}, {}
    for c in contributions:
        for src, dst, ro, why in c.binds:
            if why.endswith("(lmod_in_image)") and any(
                    b.src == b.dst and _under(dst, b.dst) and _under(src, b.src) for b in binds):
                continue        # e.g. a MODULEPATH entry in $HOME or /tmp, bound rw already
            binds.append(Bind(src, dst, ro, why))
        env_set.update(c.env)
        for k, paths in c.prepend.items():
            env_prepend.setdefault(k, []).extend(paths)

    # Working directory: the caller's, bound at its own path (as Apptainer does,
    # where the image's own directory of that name would be another directory), except
    # where that would replace a directory the image's system needs (CWD_NOT_BOUND).
    # Where the command cannot run in the caller's directory, the warning says so and
    # where it runs instead.
    cwd, gone = _cwd()
    cwd_note = None
    if opts.pwd:
        if not opts.pwd.startswith("/"):
            raise UsageError(f"{opts.prog}: --pwd wants an absolute path, got {opts.pwd!r}")
        workdir = opts.pwd
    elif opts.contain:
        workdir = home
    elif cwd is None:
        workdir = home if _covered(home, binds) else "/"
        p.warnings.append(f"cannot enter {gone} in the container (deleted on the host); "
                          f"running in {workdir}")
    else:
        workdir = cwd
        if cwd == "/" or _covered(cwd, binds):
            pass
        elif _system_dir(cwd):
            cwd_note = "system"         # _chdir says where the command runs
        elif not any(_under(cwd, d) for d in ("/proc", "/sys", "/dev")):
            binds.append(Bind(cwd, cwd, False, "current directory"))

    p.add(RootFs(image_root, root, [b.dst for b in binds]))
    p.add(IdentityFiles(base, image_root, uid, gid, user, home, gecos, pw_shell, group))
    for b in binds:
        if b.src.startswith("session:"):
            b.src = base + "/" + b.src[len("session:"):]
        b.root = root
        p.add(b)
    p.add(Remount(root))
    p.add(Pivot(root))
    p.add(Chdir(workdir, home, bool(opts.pwd), cwd_note, opts.prog))

    env, forced, prepend, append = environ.compute(
        host_env, image_path=image.path, module=module, cleanenv=opts.cleanenv,
        cli_env=opts.env, home=home, keep_prefixes=keep_prefixes)
    env.update(env_set)
    for k, paths in env_prepend.items():
        old = [x for x in env.get(k, "").split(":") if x]
        env[k] = ":".join(dict.fromkeys(paths + old))
    if opts.app is not None:
        if not valid_app(opts.app):
            raise UsageError(f"{opts.prog}: --app {opts.app!r}: not an app name")
        for k in ("APPTAINER_APPNAME", "SINGULARITY_APPNAME"):
            env[k] = opts.app
    p.add(Exec(opts.verb, list(opts.args), env, forced, prepend, append, opts.prog,
               opts.app, lmod_rc))
    return p


def split(p, op_type):
    """(ops before the first op of op_type, that op and the rest)."""
    k = next(i for i, op in enumerate(p.ops) if type(op) is op_type)
    head, tail = Plan(), Plan()
    head.ops, tail.ops = p.ops[:k], p.ops[k:]
    return head, tail
