"""image-mpi: start an MPI program from the image, with the host's launcher.

Two sides, one command:

* launcher side (not yet a rank): `image-mpi [--mpi-mode M] [LAUNCHER OPTIONS] [--]
  PROGRAM [ARGS]` execs the host launcher — `srun` inside a Slurm allocation, the host's
  `mpirun` outside — on this same runtime in rank mode, once per rank.
* rank side (PMIX_RANK, PMI_RANK, OMPI_COMM_WORLD_RANK or a Slurm step): the ranks of
  one job on one node share ONE user namespace, ONE mount namespace and ONE image mount
  (shared-memory single-copy transports — CMA, UCX's /proc links — fail between
  sibling user namespaces). The first rank forks a holder that sets the container up
  and keeps it; every rank, the first included, joins it with setns() and execs.

The holder lives while any rank lives: each rank holds a shared flock on the job's
`refs` file across exec (the fd stays open in the application); the holder waits for
the exclusive lock, then tears down and exits — its squashfuse dies with it
(PR_SET_PDEATHSIG). Where sharing is impossible (HPCIMAGE_MPI_SHARE=0, or no job key),
each rank gets its own namespaces, with CMA switched off for Open MPI and MPICH.
Standard library only.
"""
import fcntl
import os
import signal
import sys

from hpcimage.errors import HpcimageError, UsageError
from hpcimage.runtime import syscalls as sc

# Reach the rank even under --cleanenv.
FORWARD_PREFIXES = ("PMIX_", "PMI_", "SLURM_", "OMPI_", "MPICH_", "UCX_", "FI_", "PRTE_",
                    "HYDRA_", "HYDI_", "I_MPI_", "MPI_", "OMPI_MCA_", "PSM2_", "NCCL_")
RANK_MARKERS = ("PMIX_RANK", "PMI_RANK", "OMPI_COMM_WORLD_RANK", "PMI_FD")
PMIX_TRANSLATE = {"PMIX_PTL_MODULE": "PMIX_MCA_ptl", "PMIX_SECURITY_MODE": "PMIX_MCA_psec",
                  "PMIX_GDS_MODULE": "PMIX_MCA_gds"}
PMIX_DIR_VARS = ("PMIX_SERVER_TMPDIR", "PMIX_SYSTEM_TMPDIR", "PMIX_SERVER_URI_DIR",
                 "SLURM_PMIX_TMPDIR", "TMPDIR")
NO_CMA = {"OMPI_MCA_btl_vader_single_copy_mechanism": "none",
          "OMPI_MCA_smsc": "^cma", "UCX_TLS_CMA": "n", "MPIR_CVAR_CH4_SHM_POSIX_IPC": "none"}

# Launcher options that take a value (the next argument), so that
# `image-mpi -n 4 --map-by core ./solver` finds ./solver. `--` always ends them.
VALUE_OPTS = {
    "-n", "-np", "--np", "-c", "--n", "-N", "--ntasks", "--nodes", "--cpus-per-task",
    "--ntasks-per-node", "--map-by", "--bind-to", "--rank-by", "-H", "--host",
    "--hostfile", "-hostfile", "--machinefile", "-machinefile", "-f", "-x", "--x",
    "-p", "--partition", "-t", "--time", "--mem", "--mem-per-cpu", "-w", "--nodelist",
    "--mpi", "--cpu-bind", "--distribution", "-m", "-ppn", "--ppn", "--output", "-o",
    "--error", "-e", "--input", "-i", "--account", "-A", "--qos", "-q", "--gres",
    "--gpus", "-G", "--exclusive-user", "--wdir", "-D", "--chdir", "-wdir", "--prefix",
    "--export", "-genv", "-env", "--npernode", "-npernode", "--report-bindings-file",
    "-J", "--job-name", "--reservation", "--constraint", "-C", "--oversubscribe-x",
}
TWO_VALUE_OPTS = {"--mca", "-mca", "--gmca", "-gmca", "-genv", "-env"}


def is_rank(environ):
    if any(environ.get(k) for k in RANK_MARKERS):
        return True
    step = environ.get("SLURM_STEP_ID") or environ.get("SLURM_STEPID")
    return bool(step) and step.isdigit() and int(step) < 0xFFFFFFF0


def job_key(environ):
    """One name for the ranks of one job step on this node, or None."""
    for parts in (("SLURM_JOB_ID", "SLURM_STEP_ID"), ("PMIX_NAMESPACE",),
                  ("OMPI_MCA_ess_base_jobid",), ("OMPI_MCA_orte_ess_jobid",),
                  ("PMI_KVSNAME",), ("PMI_ID_SPACE",)):
        vals = [environ.get(p) for p in parts]
        if all(vals):
            key = "-".join(vals)
            return "".join(c if c.isalnum() or c in "._-" else "_" for c in key)[:120]
    return None


def split_launcher_args(args):
    """[launcher options], [program, args...] for image-mpi's command line."""
    opts, i = [], 0
    while i < len(args):
        a = args[i]
        if a == "--":
            return opts, args[i + 1:]
        if not a.startswith("-") or a == "-":
            break
        opts.append(a)
        if "=" not in a:
            if a in TWO_VALUE_OPTS:
                opts.extend(args[i + 1:i + 3])
                i += 2
            elif a in VALUE_OPTS or OUR_LONG.get(a):
                opts.extend(args[i + 1:i + 2])
                i += 1
        i += 1
    return opts, args[i:]


def implementation_of(exe):
    """'openmpi', 'mpich' or None, from the launcher's chain of links (alternatives)."""
    path, seen = exe, 0
    while True:
        name = os.path.basename(path)
        if any(k in name for k in ("openmpi", "orterun", "prterun")):
            return "openmpi"
        if any(k in name for k in ("mpich", "hydra")):
            return "mpich"
        if not os.path.islink(path) or seen > 10:
            return None
        link = os.readlink(path)
        path = link if link.startswith("/") else os.path.join(os.path.dirname(path), link)
        seen += 1


def launcher_argv(opts, environ, site, mode, runtime_opts, program):
    """The command that starts one runtime per rank."""
    policy = site.get("mpi") or {}
    forced = environ.get("HPCIMAGE_MPI_LAUNCHER") or policy.get("launcher")
    if forced == "auto":
        forced = None
    in_slurm = bool(environ.get("SLURM_JOB_ID"))
    kind = forced or ("srun" if in_slurm else "mpirun")
    from hpcimage.runtime.launch import which
    exe = which(kind, environ.get("PATH") or "/usr/bin:/bin")
    if exe is None:
        raise HpcimageError(f"image-mpi: launcher {kind!r} not found on PATH"
                            + (" (load the host MPI module?)" if kind == "mpirun" else ""))
    rank = [sys.executable, "-I", "-c", "from hpcimage.runtime.main import main; main()",
            "image-mpi-rank", "--mpi-mode", mode, *runtime_opts, "--", *program]
    argv = [exe]
    if kind.endswith("srun"):
        pmi = policy.get("srun_mpi")
        if pmi and not any(o == "--mpi" or o.startswith("--mpi=") for o in opts):
            argv.append(f"--mpi={pmi}")
    else:
        impl = policy.get("implementation") or implementation_of(exe)
        if impl == "openmpi":      # Open MPI forwards only what -x names to remote nodes
            for name in ("HPCIMAGE_IMAGE", "HPCIMAGE_MODULE", "HPCIMAGE_SITE_CONFIG"):
                if environ.get(name):
                    argv += ["-x", name]
    return argv + list(opts) + rank


def rank_environ(environ):
    """PMIx variable translation (PMIX_{PTL_MODULE,SECURITY_MODE,GDS_MODULE} ->
    PMIX_MCA_{ptl,psec,gds} when unset), for the application's environment."""
    out = {}
    for src, dst in PMIX_TRANSLATE.items():
        if environ.get(src) and not environ.get(dst):
            out[dst] = environ[src]
    return out


def pmix_dirs(environ):
    """Host directories the PMIx/PMI server talks through; bound into the container."""
    dirs = []
    for v in PMIX_DIR_VARS:
        d = environ.get(v)
        if d and d.startswith("/") and os.path.isdir(d) and d not in dirs:
            dirs.append(d)
    return dirs


# ----------------------------------------------------------------- shared namespaces

def _state_base():
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


def _start_holder(head, state, refs_path, close_fds=()):
    """Fork the holder: it carries out head (up to pivot_root), reports ready, then
    waits until no rank holds `refs`, and exits."""
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
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            signal.signal(signal.SIGHUP, signal.SIG_IGN)
            from hpcimage.runtime import launch
            try:
                launch.execute(head)
            except HpcimageError as e:
                os.write(w, ("E" + e.message).encode())
                os._exit(1)
            os.dup2(null, 2)
            fd = os.open(refs_path, os.O_RDONLY | os.O_CLOEXEC)
            os.write(w, b"R")
            os.close(w)
            fcntl.flock(fd, fcntl.LOCK_EX)         # every rank has exited
            m = os.open(os.path.dirname(state), os.O_RDONLY | os.O_DIRECTORY)
            fcntl.flock(m, fcntl.LOCK_EX)
            for name in ("holder", "refs"):
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
    msg = b""
    while True:
        chunk = os.read(r, 4096)
        if not chunk:
            break
        msg += chunk
        if msg.startswith(b"R"):
            break
    os.close(r)
    if not msg.startswith(b"R"):
        try:
            os.waitpid(pid, 0)
        except ChildProcessError:
            pass
        text = msg[1:].decode(errors="replace") if msg.startswith(b"E") else "holder died"
        raise HpcimageError(text)
    return pid


def join_shared(plan, key):
    """Set up (first rank) or find the node's shared container for job `key`, join its
    namespaces, and return the tail of the plan (chdir, exec) to carry out."""
    from hpcimage.runtime import launch
    head, tail = launch.split(plan, "chdir")
    base = _state_base()
    state = os.path.join(base, key)
    refs_path = os.path.join(state, "refs")
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
                    pid = _start_holder(head, state, refs_path, (refs, m))
                    tmp = os.path.join(state, "holder.tmp")
                    with open(tmp, "w") as f:
                        f.write(str(pid))
                    os.rename(tmp, os.path.join(state, "holder"))
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
    raise HpcimageError("image-mpi: could not join the node's shared container")


# The MPI ABI families, by the soname an application links against.
ABI = {"libmpi.so.40": "openmpi", "libmpi.so.12": "mpich", "libmpich.so.12": "mpich"}
HOST_MPI_SONAMES = {"openmpi": ("libmpi.so.40",), "mpich": ("libmpich.so.12", "libmpi.so.12")}
# Never bound from the host: the image's own C runtime must stay consistent.
from hpcimage.host import NEVER_BIND  # noqa: E402  (libc & friends)
LIBS_DIR = "/.singularity.d/libs"


def _program_mpi_sonames(program, environ):
    """The MPI sonames the program links against, read from its ELF (when the program
    is a host path that the container sees at the same path, e.g. ./solver in cwd)."""
    from hpcimage.host import elf
    path = program if "/" in program else None
    if path is None or not os.path.isfile(path):
        return []
    try:
        needed = elf.info(path).needed
    except (OSError, ValueError):
        return []
    return [n for n in needed if n in ABI]


def bind_contribution(site, environ, program):
    """The bind model: the host MPI library, its dependency closure and its component
    directories, bound into the image; refuses an ABI mismatch with the program."""
    from hpcimage import host as hostmod
    from hpcimage.host import elf
    from hpcimage.host.ldcache import LdCache
    policy = site.get("mpi") or {}
    hr = hostmod.HostRoot(environ=environ)
    cache = LdCache(hr)
    impl = policy.get("implementation") or ("openmpi" if any(k.startswith("OMPI_") for k in environ)
                                            else None)
    order = [impl] if impl else ["openmpi", "mpich"]
    found = None
    for fam in order:
        for soname in HOST_MPI_SONAMES[fam]:
            path = cache.find(soname)
            if path:
                found = (fam, soname, path)
                break
        if found:
            break
    if found is None:
        raise HpcimageError("image-mpi: --mpi-mode bind: no host MPI library found "
                            f"({', '.join(n for f in order for n in HOST_MPI_SONAMES[f])} "
                            "not in the host's ld.so.cache); load the host MPI or set mpi.prefix")
    fam, soname, path = found
    for want in _program_mpi_sonames(program, environ):
        if ABI[want] != fam:
            raise UsageError(f"image-mpi: {program} is linked against {want} "
                             f"({ABI[want]} ABI) but the host MPI is {soname} ({fam} ABI): "
                             "the bind model needs the same MPI ABI; use --mpi-mode hybrid "
                             "or build the program against the host's MPI family")
    c = hostmod.Contribution()
    # Component (plugin) directories and help/config files, at their host paths.
    libdir = os.path.dirname(path)
    dirs = [policy.get("prefix")] if policy.get("prefix") else []
    dirs += [os.path.join(libdir, d) for d in ("openmpi", "pmix2", "pmix", "mpich")]
    dirs += ["/usr/share/openmpi", "/usr/share/pmix", "/etc/openmpi", "/etc/pmix"]
    plugins = []
    for d in dirs:
        if d and hr.isdir(d):
            c.bind(hr.path(d), d, True, f"host MPI ({fam}) components")
            for top, _sub, files in os.walk(hr.path(d)):
                plugins += [os.path.join(top, f) for f in files if f.endswith(".so")]
    # The library, what it needs, and what its components need, by soname.
    todo, seen = [(soname, path)], set()

    def needs(lib):
        try:
            for n in elf.info(lib).needed:
                if n not in seen and not n.startswith(NEVER_BIND):
                    q = cache.find(n)
                    if q:
                        todo.append((n, q))
                    elif n not in missing:
                        missing.append(n)
        except (OSError, ValueError):
            pass
    missing = []
    for plugin in plugins:
        needs(plugin)
    while todo:
        name, lib = todo.pop()
        if name in seen or name.startswith(NEVER_BIND):
            continue
        seen.add(name)
        c.bind(lib, f"{LIBS_DIR}/{name}", True, f"host MPI ({fam}) for the bind model")
        needs(lib)
    if missing:
        c.notes.append("host MPI dependencies not in ld.so.cache: " + ", ".join(missing))
    c.add_prepend("LD_LIBRARY_PATH", LIBS_DIR)
    return c


def run_rank(opts, image, site, environ):
    """Rank side: plan, then shared (or per-rank) namespaces, then exec."""
    from hpcimage.runtime import launch
    env = dict(environ)
    env.update(rank_environ(environ))
    key = job_key(environ) if environ.get("HPCIMAGE_MPI_SHARE", "1") != "0" else None
    if key is None:
        for k, v in NO_CMA.items():
            env.setdefault(k, v)
    extra = [d for d in pmix_dirs(environ)]
    contributions = []
    mode = opts.mpi_mode or (site.get("mpi") or {}).get("mode") or "hybrid"
    if mode == "bind":
        contributions.append(bind_contribution(site, environ, opts.args[0] if opts.args else ""))
    p = launch.plan(opts, image, site, env, extra_binds=extra, keep_prefixes=FORWARD_PREFIXES,
                    contributions=contributions)
    if opts.dry_run:
        sys.stdout.write(p.describe())
        sys.stdout.write(f"# ranks share namespaces: {'yes, job ' + key if key else 'no'}\n")
        return 0
    p.warn(opts.prog, environ)
    if key is None:
        launch.execute(p)
        return 1
    tail = join_shared(p, key)
    launch.execute(tail)
    return 1


OUR_LONG = {"--mpi-mode": True, "--bind": True, "--pwd": True, "--env": True,
            "--cleanenv": False, "--contain": False, "--no-home": False, "--dry-run": False,
            "--nv": False, "--rocm": False, "--ib": False, "--launcher": True}


def main(argv, environ, site):
    """`image-mpi ...`: rank side when started by a launcher, else start the launcher."""
    from hpcimage.runtime import options
    if is_rank(environ):
        opts = options.parse(["image-mpi-rank", *argv[1:]], environ)
        opts.prog = "image-mpi"
        from hpcimage.image import open_image
        from hpcimage.runtime import local
        opts.image = local.choose(opts.image, site, environ)   # image-update's copy
        return run_rank(opts, open_image(opts.image), site, environ)
    args = argv[1:]
    if args[:1] in (["-h"], ["--help"]):
        sys.stdout.write(HELP)
        return 0
    if not environ.get("HPCIMAGE_IMAGE"):
        raise UsageError("image-mpi: no image module loaded: run 'module load "
                         "<Name/version>' first ('module avail' lists the images)")
    launcher_opts, program = split_launcher_args(args)
    ours, rest, mode, launcher, dry = [], [], None, None, False
    i = 0
    while i < len(launcher_opts):
        a = launcher_opts[i]
        name, eq, val = a.partition("=")
        if name in OUR_LONG:
            if OUR_LONG[name] and not eq:
                i += 1
                val = launcher_opts[i] if i < len(launcher_opts) else ""
            if name == "--mpi-mode":
                mode = val
            elif name == "--launcher":
                launcher = val
            elif name == "--dry-run":
                dry = True
            else:
                ours += [name, val] if OUR_LONG[name] else [name]
        else:
            rest.append(a)
        i += 1
    if not program:
        raise UsageError("image-mpi: no program given (usage: image-mpi [OPTIONS] "
                         "[LAUNCHER OPTIONS] [--] PROGRAM [ARGS...])")
    mode = mode or (site.get("mpi") or {}).get("mode") or "hybrid"
    if mode not in ("hybrid", "bind"):
        raise UsageError(f"image-mpi: --mpi-mode wants hybrid or bind, not {mode!r}")
    env = dict(environ)
    if launcher:
        env["HPCIMAGE_MPI_LAUNCHER"] = launcher
    argv2 = launcher_argv(rest, env, site, mode, ours, program)
    if not argv2[0].endswith("srun"):
        # Open MPI 4.1 loses track of exits when it starts 32+ local ranks from threads.
        env.setdefault("OMPI_MCA_odls_base_max_threads", "0")
    if dry:
        sys.stdout.write(" ".join(argv2) + "\n")
        return 0
    sys.stdout.flush()
    try:
        os.execve(argv2[0], argv2, env)
    except OSError as e:
        raise HpcimageError(f"image-mpi: cannot start {argv2[0]}: {e.strerror}") from None


HELP = """\
usage: image-mpi [OPTIONS] [LAUNCHER OPTIONS] [--] PROGRAM [ARGS...]

Starts PROGRAM from the loaded image once per MPI rank: with srun inside a Slurm
allocation, with the host's mpirun outside (`srun image-mpi PROGRAM` works too).
Launcher options pass through (image-mpi -n 4 --map-by core ./solver); put `--`
before PROGRAM when an option is not recognised as taking a value.

options:
  --mpi-mode hybrid|bind   hybrid: the image's MPI, wired to the host through PMIx/PMI;
                           bind: the host's MPI library bound into the image
  --launcher srun|mpirun   choose the launcher
  --bind, --env, --pwd, --cleanenv, --contain, --no-home, --nv, --rocm, --ib
                           as for image-exec, for every rank
  --dry-run                print the launcher command line and exit
"""
