"""The steps of a launch plan, in order (STEPS). Each is a function step(request, plan)
that reads the request (runtime.request.Request) and adds to the plan
(runtime.plan.Plan): ops, binds (plan.binds: the container's mounts, in order, made
ops by the `root` step), contributions (host.Contribution: their warnings and notes
at once, their binds and environment by later steps), warnings, notes. `plan()` runs
them and knows none by name; MPI ranks run the same tuple with their own steps put in
(runtime.mpi.rank). Standard library only: the hot path.
"""
import os

from hpcimage.errors import UsageError
from hpcimage.runtime import binds
from hpcimage.runtime import environ as envmod
from hpcimage.runtime.command import valid_app
from hpcimage.runtime.ops import (Bind, Chdir, Exec, HostDirs, IdentityFiles, MountImage,
                                  Pivot, Private, Process, Remount, RootFs, Session, UserNs)


# A current directory that is one of these (or directly below /usr, /usr/local or
# /usr/lib*) is not bound: the host's would replace what the image's system needs
# (Apptainer's addCwdMount list, with the merged-/usr names). Any other directory is
# bound at its path, below a system directory too (/usr/local/src/proj); /proc, /sys
# and /dev are the host's already (or a private /dev).
CWD_NOT_BOUND = ("/", "/bin", "/boot", "/etc", "/lib", "/lib32", "/lib64", "/libx32", "/mnt",
                 "/opt", "/run", "/sbin", "/usr", "/var", "/var/lib")


CWD_NOT_BOUND_BELOW = ("/usr", "/usr/local", "/usr/lib", "/usr/lib32", "/usr/lib64",
                       "/usr/libx32")




def is_under(path, top):
    return path == top or path.startswith(top.rstrip("/") + "/")


def _covered(path, binds):
    """path is below a host directory bound at its own path."""
    return any(b.src == b.dst and is_under(path, b.dst) for b in binds
               if not b.src.startswith("session:"))


def _system_dir(path):
    return path in CWD_NOT_BOUND or os.path.dirname(path) in CWD_NOT_BOUND_BELOW


def workdir_dirs(o):
    """-W/--workdir: (its directories, its tmp directories) this launch uses: scratch
    (-S), and with --contain home, tmp and var_tmp (as Apptainer's)."""
    if not o.workdir:
        return [], []
    w = os.path.abspath(o.workdir)
    dirs = [f"{w}/scratch/{os.path.basename(os.path.normpath(d))}" for d in o.scratch]
    if o.contain:
        return dirs + [w + "/home"], [w + "/tmp", w + "/var_tmp"]
    return dirs, []


def session(r, p):
    """The user namespace (and the IPC and UTS ones where asked), private mounts, the
    session tmpfs, the image mounted there; the options' warnings (variables)."""
    o = r.opts
    p.warnings.extend(o.warnings)
    dirs, tmp = workdir_dirs(o)
    if dirs or tmp:
        p.add(HostDirs(dirs, tmp))
    p.add(UserNs(r.uid, r.gid, o.ipc, o.uts, o.hostname, fakeroot_map(r, p)))
    p.add(Private())
    p.add(Session(r.session_dir, 0 if o.workdir else len(o.scratch)))
    image = r.image
    if getattr(image, "crypt", None):     # an encrypted SIF: gocryptfs first (runtime/crypt)
        from hpcimage.runtime import crypt
        image = crypt.decrypt(r, p)
    p.add(MountImage(image, r.session_dir + "/image", writable=writable_image(r)))


def fakeroot_map(r, p):
    """--fakeroot: the IdMap (linux.idmap) of the caller's ids, subordinate ids where
    /etc/subuid and /etc/subgid give the user ranges (and newuidmap exists), else a
    single id with a warning; None without --fakeroot (or for root)."""
    if not getattr(r.opts, "fakeroot", False) or r.uid == 0:
        return None
    from hpcimage.linux.idmap import IdMap
    m = IdMap.fakeroot(r.uid, r.gid, r.environ.get("PATH"))
    if m.mode == "single":
        p.warnings.append(f"--fakeroot: {m.why}: only your own ids are mapped (you are "
                          "root inside; files of other owners show as nobody, chown to "
                          "them fails)")
    return m


def writable_image(r):
    """--writable: the image is a sandbox directory the caller can write (bound
    read-write), else an error naming why (a SquashFS file is read-only; a SIF needs
    an overlay partition)."""
    if not getattr(r.opts, "writable", False):
        return False
    image = r.image
    if image.kind == "squashfs":
        raise UsageError(f"--writable: {image.path} is a SquashFS image (read-only): use a "
                         "sandbox directory (hpcimage build --sandbox) or --overlay")
    if image.kind == "sif":
        return False    # its overlay partition, writable (image.overlay.layers; an error without one)
    if not os.access(image.path, os.W_OK):
        raise UsageError(f"--writable: {image.path}: you cannot write this sandbox "
                         "directory (--writable needs one you own)")
    return True


def host_devices(r, p):
    """GPUs (--nv, --rocm, the site's gpu policy) and InfiniBand (--ib, infiniband):
    hpcimage.host reads the host through one root (HPCIMAGE_HOST_ROOT) and binds
    nothing where nothing is found. Device nodes go into /dev (system_binds): a private
    /dev where GPUs are left out (*_VISIBLE_DEVICES) or the host root is not this
    machine's /; the driver libraries with the other contributions' binds."""
    from hpcimage import host as hostmod
    opts = r.opts
    hw = hostmod.discover(r.site, r.environ, nv=opts.nv, rocm=opts.rocm, ib=opts.ib)
    dev = [b for b in hw.binds if b[1] == "/dev" or b[1].startswith("/dev/")]
    hw.binds = [b for b in hw.binds if b not in dev]
    p.dev_binds = dev
    p.private_dev = bool(dev and (hw.hide or not hostmod.HostRoot(environ=r.environ).is_real))
    p.contribute(hw)


def mpi_rank_alone(r, p):
    """An MPI rank started by `srun image-exec` or `mpirun image-exec` (not image-mpi)
    runs in a container of its own: Open MPI's and MPICH's cross-memory attach between
    ranks (CMA, process_vm_readv, refused across user namespaces) is switched off, where
    its large messages would hang, and UCX attaches shared memory by name in /dev/shm
    rather than through /proc/PID/fd, also refused there (MPI_Init fails with "Shared
    memory error", openucx/ucx#4224) (jobenv.NO_CMA, unless the caller set those
    variables); rank 0 says so once and names image-mpi, which shares one container per
    node."""
    from hpcimage.runtime.mpi.jobenv import NO_CMA, RANK_MARKERS
    if r.opts.prog == "image-mpi" or not any(r.environ.get(k) for k in RANK_MARKERS):
        return
    off = {k: v for k, v in NO_CMA.items() if k not in r.environ}
    p.env_add.update(off)
    p.warnings.append("an MPI rank in a container of its own: cross-memory attach between "
                      "ranks is off, shared memory is attached by name (" + " ".join(f"{k}={v}" for k, v in off.items())
                      + "); image-mpi runs a node's ranks in one container")


def lmod_inside(r, p):
    """site.json "lmod" (site.yaml lmod_in_image): the host's Lmod, its Lua and the
    MODULEPATH (imported only here: the plain image-exec path stays light). Its binds
    already covered by a bind at the same path are left out (skip_covered)."""
    if r.site.lmod is None:
        return
    from hpcimage.host import lmod
    config = r.environ.get("HPCIMAGE_SITE_CONFIG")
    c = lmod.discover(r.site.lmod, r.environ,
                      site_dir=os.path.dirname(config) if config else None)
    p.contribute(c)
    p.keep_prefixes += lmod.CLEANENV_KEEP_PREFIXES
    p.rcfile = c.env.get("BASH_ENV")


def system_binds(r, p):
    """/proc, /sys, /dev (or a private one with the devices), /tmp and /var/tmp (fresh
    ones under --contain), /etc/hosts and /etc/localtime (Apptainer's default `bind
    path` entries), /etc/resolv.conf, passwd and group; --no-mount leaves out what it
    names (runtime.binds.NO_MOUNT)."""
    contain = r.opts.contain
    nm = binds.no_mount(r.opts)
    private_dev = contain or p.private_dev
    out = p.binds
    for src in ("/proc", "/sys", "/dev"):
        if (private_dev and src == "/dev") or src[1:] in nm:
            continue
        out.append(Bind(src, src, False, "system"))
    if private_dev and "dev" not in nm:
        why = "--contain: minimal /dev" if contain else "minimal /dev + selected devices"
        out.append(Bind("session:dev", "/dev", False, why))
        for d in ("null", "zero", "full", "random", "urandom", "tty"):
            if os.path.exists("/dev/" + d):
                out.append(Bind("/dev/" + d, "/dev/" + d, False, why))
        if os.path.isdir("/dev/pts") and "devpts" not in nm:
            out.append(Bind("/dev/pts", "/dev/pts", False, why))
        if not contain and os.path.isdir("/dev/shm"):
            out.append(Bind("/dev/shm", "/dev/shm", False, why))
        for src, dst, ro, w in p.dev_binds:
            out.append(Bind(src, dst, False, w))
    wtmp = workdir_dirs(r.opts)[1] if contain and r.opts.workdir else None
    for i, (d, fresh) in enumerate((("/tmp", "session:tmp"), ("/var/tmp", "session:vartmp"))):
        if "tmp" in nm or d in nm:          # --no-mount tmp: both; a path: that one
            continue
        if wtmp:
            out.append(Bind(wtmp[i], d, False, f"--contain: -W's {('tmp', 'var_tmp')[i]}"))
        elif contain:
            out.append(Bind(fresh, d, False, f"--contain: fresh {d}"))
        elif d == "/tmp" or os.path.isdir(d):
            out.append(Bind(d, d, False, "system"))
    for f, bind_path in (("/etc/hosts", True), ("/etc/localtime", True),
                         ("/etc/resolv.conf", False)):
        if os.path.exists(f) and not binds.skipped(f, nm, bind_path):
            out.append(Bind(os.path.realpath(f), f, True, "host's " + f))
    out.append(Bind("session:passwd", "/etc/passwd", True, "image passwd + the user"))
    out.append(Bind("session:group", "/etc/group", True, "image group + the user's group"))


def home(r, p):
    """The home directory: -H's source at its destination (--contain too, as
    Apptainer's), else the host's at its path, an empty one under --contain (-W's home
    with -W); --no-mount home: none."""
    if r.home_src is not None:
        if not os.path.isdir(r.home_src):
            raise UsageError(f"--home {r.opts.home}: {r.home_src} is not a directory")
        p.binds.append(Bind(r.home_src, r.home, False,
                            "--home" if r.opts.home else "--fakeroot: your home at /root"))
    elif "home" in binds.no_mount(r.opts):
        return
    elif r.opts.contain and r.opts.workdir:
        p.binds.append(Bind(workdir_dirs(r.opts)[0][-1], r.home, False, "--contain: -W's home"))
    elif r.opts.contain:
        p.binds.append(Bind("session:home", r.home, False, "--contain: empty home"))
    elif (not r.opts.no_home and r.home != "/" and os.path.isdir(r.home)
          and not getattr(r.opts, "fakeroot", False)):
        p.binds.append(Bind(r.home, r.home, False, "home"))


def site_binds(r, p):
    """The site's binds (site.json binds, and image_binds of the loaded module) whose
    source exists, less those --no-mount names (bind-paths: all of them)."""
    module = r.environ.get("HPCIMAGE_MODULE")
    site = r.site
    nm = binds.no_mount(r.opts)
    specs = list(site.binds) + list(site.image_binds.get(module or "", ()))
    for spec in specs:
        if "bind-paths" in nm:
            break
        n = len(p.ops)
        b = binds.add_spec(p, spec, "site", r.cwd, r.session_dir, missing_ok=True)
        if b is not None and b.dst in nm:
            p.binds.pop()
            del p.ops[n:]


def user_binds(r, p):
    """The binds of the *_BIND/*_BINDPATH variables and HPCIMAGE_BIND, then -B (the
    options put them in opts.binds in that order): a missing source is an error; an
    image bind (image-src=, id=) mounts the image file first."""
    for spec in r.opts.binds:
        binds.add_spec(p, spec, "-B", r.cwd, r.session_dir, missing_ok=False)


def scratch(r, p):
    """-S/--scratch: an empty writable directory at each path, from the session (gone
    at the end) or, with -W, from WORKDIR/scratch/NAME (kept)."""
    o = r.opts
    if not o.scratch:
        return
    dirs = workdir_dirs(o)[0]
    for n, d in enumerate(o.scratch):
        if not d.startswith("/"):
            raise UsageError(f"--scratch wants an absolute path, got {d!r}")
        src = dirs[n] if o.workdir else f"session:scratch/{n}"
        p.binds.append(Bind(src, os.path.normpath(d), False, "--scratch"))


def contributed_binds(r, p):
    """The contributions' binds (driver libraries, MPI bind model, Lmod inside), in the
    order they came."""
    binds = p.binds
    for c in p.contributions:
        for src, dst, ro, why in c.binds:
            if c.skip_covered and any(b.src == b.dst and is_under(dst, b.dst) and is_under(src, b.src)
                            for b in binds):
                continue
            binds.append(Bind(src, dst, ro, why))


def cwd(r, p):
    """The working directory: the caller's, bound at its own path (as Apptainer does,
    where the image's own directory of that name would be another directory), except
    where that would replace a directory the image's system needs (CWD_NOT_BOUND).
    Where the command cannot run in the caller's directory, the warning says so and
    where it runs instead."""
    opts, home, bl = r.opts, r.home, p.binds
    p.cwd_note = None
    if opts.pwd:
        if not opts.pwd.startswith("/"):
            raise UsageError(f"--pwd wants an absolute path, got {opts.pwd!r}")
        p.workdir = opts.pwd
    elif opts.contain:
        p.workdir = home
    elif r.cwd is None:
        p.workdir = home if _covered(home, bl) else "/"
        p.warnings.append(f"cannot enter {r.cwd_gone} in the container (deleted on the "
                          f"host); running in {p.workdir}")
    else:
        p.workdir = r.cwd
        if r.cwd == "/" or _covered(r.cwd, bl):
            pass
        elif _system_dir(r.cwd):
            p.cwd_note = "system"       # enter_workdir says where the command runs
        elif "cwd" in binds.no_mount(opts):
            pass                        # --no-mount cwd: the image's own, else home
        elif not any(is_under(r.cwd, d) for d in ("/proc", "/sys", "/dev")):
            bl.append(Bind(r.cwd, r.cwd, False, "current directory"))


def _fuse_whiteouts(layer):
    """Whether fuse-overlayfs has written a directory layer: its FUSE_MARK (left by
    runtime.overlay), or whiteouts (.wh.NAME files) at the top of its upper/ (else of
    itself), which the kernel's overlayfs shows as files: such a layer is read by
    fuse-overlayfs. A stat and one directory read."""
    if layer.kind != "dir":
        return False
    from hpcimage.image.overlay import FUSE_MARK
    if os.path.exists(layer.path + "/" + FUSE_MARK):
        return True
    for top in (layer.path + "/upper",) + (() if layer.writable else (layer.path,)):
        try:
            with os.scandir(top) as it:
                return any(e.name.startswith(".wh.") for e in it)
        except OSError:
            continue
    return False


def overlay(r, p):
    """The overlays (r.overlays: a SIF's own overlay partition, --overlay, --writable,
    --writable-tmpfs): each layer locked and mounted (OverlayLayer), then the union of
    the image and the layers (OverlayMount, runtime.overlay) with the bind targets the
    image lacks in a layer of their own; the root is the union (p.image_root), writable
    where a layer is (p.root_writable)."""
    if not r.overlays:
        return
    from hpcimage.image.overlay import DRIVER_VARIABLE
    from hpcimage.runtime.ops import OverlayLayer, OverlayMount
    from hpcimage.runtime.overlay import lower_dir
    base = r.session_dir
    # Read-only layers as Apptainer stacks them (OverlaySet.options: lowerdir = the
    # read-only overlays in the order given, then the image): the first given is the
    # uppermost; the image's own SIF overlay partition sits right on the image.
    lowers, own, upper, work = [], [], None, None
    for n, layer in enumerate(r.overlays):
        at = f"{base}/layers/{n}"
        p.add(OverlayLayer(layer, at, r.opts.prog))
        if layer.writable:
            upper, work = lower_dir(layer, at), at + "/work"
        elif layer.offset and layer.spec == layer.path:
            own.append(lower_dir(layer, at))
        else:
            lowers.append(lower_dir(layer, at))
    lowers += own
    how = r.environ.get(DRIVER_VARIABLE) or r.site.overlay_driver or "auto"
    if how not in ("auto", "kernel", "fuse-overlayfs"):
        raise UsageError(f"{DRIVER_VARIABLE}={how}: want auto, kernel or fuse-overlayfs")
    if any(x.kind == "ext3" or _fuse_whiteouts(x) for x in r.overlays):
        how = "fuse-overlayfs"      # what fuse-overlayfs may have written, read-only or not
    targets = [(b.dst, base + "/" + b.src[8:] if b.src.startswith("session:") else b.src)
               for b in p.binds]
    p.image_root = base + "/overlay"
    p.add(OverlayMount(p.image_root, lowers + [base + "/image"], upper, work,
                       base + "/layers/points", targets, base + "/image", how))
    p.root_writable = upper is not None
    if upper is not None and r.uid != 0 and not getattr(r.opts, "fakeroot", False):
        p.notes.append("the image's root-owned directories stay read-only through the "
                       "overlay (EOVERFLOW or EACCES on writing them): --fakeroot writes them")


def root(r, p):
    """The root with every bind's mount point, passwd and group, the binds (session:
    sources resolved to the session directory), read-only (unless an overlay is
    writable), pivot, chdir."""
    base = r.session_dir
    rootdir, image_root = base + "/root", p.image_root or base + "/image"
    in_image = p.image_root is None and getattr(r.opts, "writable", False)   # a sandbox
    p.add(RootFs(image_root, rootdir, [b.dst for b in p.binds], in_image))
    if getattr(r.opts, "fakeroot", False):      # root inside: the image's root entry
        p.add(IdentityFiles(base, image_root, 0, 0, "root", r.home, "root", "/bin/sh",
                            "root"))
    else:
        p.add(IdentityFiles(base, image_root, r.uid, r.gid, r.user, r.home, r.gecos,
                            r.shell, r.group))
    for b in p.binds:
        if b.src.startswith("session:"):
            b.src = base + "/" + b.src[len("session:"):]
        b.root = rootdir
        p.add(b)
    if not getattr(r.opts, "writable", False) and not p.root_writable:
        p.add(Remount(rootdir))
    p.add(Pivot(rootdir))
    p.add(Chdir(p.workdir, r.home, bool(r.opts.pwd), p.cwd_note, r.opts.prog))


def process(r, p):
    """--no-umask (0022) and --pid (--no-init: the command is PID 1): Process, before
    the exec."""
    o = r.opts
    if o.no_umask or o.pid:
        p.add(Process(0o022 if o.no_umask else None, o.pid, not o.no_init))


def command(r, p):
    """The container's environment (runtime.environ, then the contributions' variables
    and paths), the app, the exec."""
    opts = r.opts
    host_env = {**r.environ, **p.env_add} if p.env_add else r.environ
    envfile = getattr(opts, "env_file", None)
    if envfile is not None:
        try:
            with open(envfile, encoding="utf-8", errors="surrogateescape") as f:
                envfile = f.read()
        except OSError as e:
            raise UsageError(f"--env-file {envfile}: {e.strerror}") from None
    env, forced, prepend, append, late = envmod.compute(
        host_env, image_path=r.image.path, module=r.environ.get("HPCIMAGE_MODULE"),
        cleanenv=opts.cleanenv, cli_env=opts.env, home=r.home, keep_prefixes=p.keep_prefixes,
        verb=opts.verb, binds=list(opts.binds), envfile=envfile,
        no_eval=getattr(opts, "no_eval", False),
        uid=0 if getattr(opts, "fakeroot", False) else r.uid,
        gid=0 if getattr(opts, "fakeroot", False) else r.gid)
    for var, why in late.skipped:
        p.warnings.append(f"{var}: {why}: not set in the container")
    env_prepend = {}
    for c in p.contributions:
        env.update(c.env)
        for k, paths in c.prepend.items():
            env_prepend.setdefault(k, []).extend(paths)
    for k, paths in env_prepend.items():
        old = [x for x in env.get(k, "").split(":") if x]
        env[k] = ":".join(dict.fromkeys(paths + old))
        late.inject[k] = list(dict.fromkeys(paths))    # merged last, after the scripts
    if opts.app is not None:
        if not valid_app(opts.app):
            raise UsageError(f"--app {opts.app!r}: not an app name")
        for k in ("APPTAINER_APPNAME", "SINGULARITY_APPNAME"):
            env[k] = opts.app
    p.add(Exec(opts.verb, list(opts.args), env, forced, prepend, append, opts.prog,
               opts.app, p.rcfile, late))


def signature_policy(r, p):
    """site.json verify/image_verify (docs/signing.md): a wrapper's image not recorded
    as signed by a key the site trusts is refused (require: exit 2) or warned about
    (warn). Reads only the records publish and image-update wrote; nothing when off."""
    if r.site.verify == "off" and not r.site.image_verify:
        return
    if not r.opts.prog.startswith("image-"):
        return
    from hpcimage.runtime.localcopy import signature_problem
    problem = signature_problem(r.opts.image, r.image.path, r.environ.get("HPCIMAGE_MODULE"),
                                r.site, r.environ)
    if problem is None:
        p.notes.append("signature: recorded as signed by a key the site trusts")
    elif problem[0] == "require":
        raise UsageError(problem[1])
    else:
        p.warnings.append(problem[1])


STEPS = (signature_policy, session, host_devices, mpi_rank_alone, lmod_inside, system_binds, home, site_binds, user_binds,
         scratch, contributed_binds, cwd, overlay, root, process, command)


def with_steps(steps, after):
    """steps with more put in: after maps a step to the steps that follow it."""
    out = []
    for s in steps:
        out.append(s)
        out.extend(after.get(s, ()))
    return tuple(out)
