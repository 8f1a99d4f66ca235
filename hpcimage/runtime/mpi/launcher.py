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
import _signal as signal  # the C module: the same names, without enum (~4 ms)
import sys

from hpcimage.errors import HpcimageError, UsageError
from hpcimage.linux import syscalls as sc
from hpcimage.linux import procstate

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
    """One name for the ranks of one job step on this node, or None. HPCIMAGE_MPI_KEY
    (set by an image-mpi launcher that prepared the container itself) comes first."""
    for parts in (("HPCIMAGE_MPI_KEY",), ("SLURM_JOB_ID", "SLURM_STEP_ID"), ("PMIX_NAMESPACE",),
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


def launcher_kind(environ, policy):
    """(launcher name, why): HPCIMAGE_MPI_LAUNCHER, else the site's mpi.launcher, else
    (either is "auto" or unset) srun inside a Slurm allocation and mpirun outside."""
    env, site = environ.get("HPCIMAGE_MPI_LAUNCHER"), policy.get("launcher")
    forced = env or site
    if forced and forced != "auto":
        return forced, ("HPCIMAGE_MPI_LAUNCHER" if env else "site mpi.launcher") + f"={forced}"
    if environ.get("SLURM_JOB_ID"):
        return "srun", f"inside Slurm allocation {environ['SLURM_JOB_ID']}"
    return "mpirun", "no Slurm allocation: SLURM_JOB_ID unset"


def launcher_argv(opts, environ, site, mode, runtime_opts, program):
    """The command that starts one runtime per rank."""
    policy = site.get("mpi") or {}
    kind = launcher_kind(environ, policy)[0]
    from hpcimage.linux.paths import which
    exe = which(kind, environ.get("PATH") or "/usr/bin:/bin")
    if exe is None:
        raise HpcimageError(f"image-mpi: launcher {kind!r} not found on PATH"
                            + (" (load the host MPI module?)" if kind == "mpirun" else ""))
    rank = [sys.executable, "-I", "-c", "from hpcimage.runtime.main import main; main()",
            "image-mpi-rank", "--mpi-mode", mode, *runtime_opts, "--", *program]
    joiner = join_helper(environ)
    if joiner:
        rank.insert(0, joiner)
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


def _warm_arg(tail):
    """(command, the container's PATH) of a tail's exec step, or None."""
    op = tail.ops[-1]
    if op[0] != "exec" or not op[2]:
        return None
    return op[2][0], op[3].get("PATH", "")


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
    from hpcimage.runtime.command import _chdir
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
                _chdir(workdir, home, False)
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


def _start_holder(head, state, refs_path, close_fds=(), warm=None, probe=None):
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


JOIN_HELPER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "hpcimage-join")
# Variables that may differ between the ranks of one job (PMIX_RANK, OMPI_COMM_WORLD_RANK,
# SLURM_PROCID, ...): a joining rank passes its own; every other variable must equal the
# planning rank's for the recipe to apply.
# Prefixes of NAME=VALUE. LAUNCHER_EXTRA: what the launchers set besides OMPI_/PMIX_/
# SLURM_: Open MPI's mpirun HFI_, IPATH_, PWD (the rank's directory, which must equal
# the planned one anyway) and `_` (the launching shell's last command); srun
# SLURMD_NODENAME, SRUN_DEBUG and TMPDIR (Slurm 22.05 sets TMPDIR=/tmp, when it is
# unset, for the node's first task only). Passed per rank like the others, or, under
# --cleanenv (which drops them), neither compared nor passed.
VARY_PREFIXES = FORWARD_PREFIXES
LAUNCHER_EXTRA = ("HFI_", "IPATH_", "_=", "PWD=", "TMPDIR=", "SLURMD_", "SRUN_")


def join_helper(environ):
    """The compiled per-rank joiner (hpcimage/runtime/join.c, built at install time when
    a C compiler is there), or None: then every rank is a Python runtime."""
    if environ.get("HPCIMAGE_MPI_JOIN", "1") == "0" or environ.get("HPCIMAGE_MPI_SHARE") == "0":
        return None
    return JOIN_HELPER if os.access(JOIN_HELPER, os.X_OK) else None


class Recipe:
    """What hpcimage-join needs to do what a rank's `tail` (chdir, exec) does, for any
    rank of the job. environ: the planning environment (a rank's, or the launcher's)."""

    def __init__(self, tail, environ, signature, cwd, cleanenv=False):
        from hpcimage.runtime import environ as envmod
        (c_name, self.workdir, self.home, self.explicit), e_op = tail.ops[0][:4], tail.ops[1]
        verb, args, env, forced, prepend, append, self.prog, app = e_op[1:9]
        self.ok = (c_name == "chdir" and e_op[0] == "exec" and verb == "exec"
                   and app is None and (len(e_op) < 10 or e_op[9] is None))
        label = self.prog if self.prog.startswith("image-") else "hpcimage"
        self.direct = envmod.direct_env(env, forced, prepend, append)
        self.shell = envmod.shell_env(env, forced, prepend, append, label)
        self.script = envmod.shell_prologue(forced, prepend, append, None) + envmod.SHELL_EXEC
        self.vary = tuple(VARY_PREFIXES) + (() if cleanenv else LAUNCHER_EXTRA)
        self.ignore = LAUNCHER_EXTRA if cleanenv else ()
        self.environ, self.signature, self.cwd = dict(environ), signature, cwd
        self.keep = sorted({k for out in (self.direct, self.shell) for k, v in out.items()
                            if self.varies(k) and environ.get(k) != v})
        self.final = None

    def varies(self, k):
        return f"{k}=".startswith(self.vary)

    def probe_args(self):
        """_probe_env's arguments (run by the holder, in the container)."""
        return (self.script, self.shell, self.workdir, self.home, self.varies, set(self.keep))

    def encode(self):
        """The recipe file (join.c reads it), or None."""
        return recipe(self) if self.ok else None


def recipe(r):
    """The recipe file's bytes: MAGIC NUL, then KEY NUL VALUE NUL pairs."""
    environ, vary, ignore, keep = r.environ, r.vary, r.ignore, r.keep
    signature, cwd, workdir, home = r.signature, r.cwd, r.workdir, r.home
    explicit, prog, script, direct, shell = r.explicit, r.prog, r.script, r.direct, r.shell
    varies = r.varies
    enc = os.fsencode
    items = [(b"sig", enc(signature)), (b"cwd", enc(cwd)), (b"workdir", enc(workdir)),
             (b"home", enc(home)), (b"explicit_pwd", b"1" if explicit else b"0"),
             (b"prog", enc(prog)), (b"script", enc(script))]
    items += [(b"vary", enc(v)) for v in vary]
    items += [(b"ignore", enc(v)) for v in ignore]
    items += [(b"keep", enc(k)) for k in keep]
    items += [(b"translate", enc(f"{a}={b}")) for a, b in PMIX_TRANSLATE.items()]
    items += [(b"host", enc(f"{k}={v}")) for k, v in environ.items()
              if not varies(k) and not f"{k}=".startswith(ignore or ("\0",))]
    items += [(b"out", enc(f"{k}={v}")) for k, v in direct.items()]
    items += [(b"sh_out", enc(f"{k}={v}")) for k, v in shell.items()]
    if r.final is not None:         # the env scripts' result (the holder's probe)
        items += [(b"final", enc(f"{k}={v}")) for k, v in r.final.items()]
        items += [(b"final_keep", enc(k)) for k, v in r.final.items()
                  if varies(k) and environ.get(k) != v]
    if any(b"\0" in v for _, v in items):
        return None
    return b"HPCIMAGE-RECIPE 1\0" + b"".join(k + b"\0" + v + b"\0" for k, v in items)


def _write_recipe(state, data):
    if not data:
        return
    tmp = os.path.join(state, "recipe.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        while data:
            data = data[os.write(fd, data):]
    finally:
        os.close(fd)
    os.rename(tmp, os.path.join(state, "recipe"))


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
    head, tail = launch.split(plan, "chdir")
    base = _state_base()
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
                    pid, final = _start_holder(head, state, refs_path, (refs, m),
                                               _warm_arg(tail),
                                               rec.probe_args() if rec and rec.ok else None)
                    tmp = os.path.join(state, "holder.tmp")
                    with open(tmp, "w") as f:
                        f.write(str(pid))
                    os.rename(tmp, os.path.join(state, "holder"))
                    if rec is not None and rec.ok:    # the other ranks: hpcimage-join
                        rec.final = final
                        _write_recipe(state, rec.encode())
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


from hpcimage.host.mpi import bind_contribution  # noqa: E402


def rank_signature(rest, opts):
    """The runtime options of a rank's command line (REST: after image-mpi-rank) cut the
    way hpcimage-join cuts them (up to the first `--`), or None when that cut does not
    give the program the runtime parsed."""
    rest = list(rest)
    if "--" not in rest or any("\x1f" in a for a in rest):
        return None
    k = rest.index("--")
    if rest[k + 1:] != list(opts.args):
        return None
    return "".join(a + "\x1f" for a in rest[:k])


def wrapper_signature(rest, opts):
    """The same for the wrapper form, `srun image-mpi [OPTIONS] [--] PROGRAM` (no `--`
    needed): "image-mpi" and the words the parser took as options; hpcimage-join
    accepts a rank whose words start with exactly those and go on with PROGRAM."""
    rest = list(rest)
    n = len(rest) - len(opts.args)
    if n < 0 or rest[n:] != list(opts.args) or any("\x1f" in a for a in rest):
        return None
    return "".join(a + "\x1f" for a in ["image-mpi", *rest[:n]])


def run_rank(opts, image, site, environ, signature=None):
    """Rank side: plan, then shared (or per-rank) namespaces, then exec. signature:
    the rank's runtime options as hpcimage-join sees them (for the recipe)."""
    from hpcimage.runtime.execute import execute
    locked = environ.pop("HPCIMAGE_MPI_LOCKED_FD", None)
    os.environ.pop("HPCIMAGE_MPI_LOCKED_FD", None)
    key = job_key(environ) if environ.get("HPCIMAGE_MPI_SHARE", "1") != "0" else None
    p = rank_plan(opts, image, site, environ, shared=key is not None)
    if opts.dry_run:
        sys.stdout.write(p.describe())
        sys.stdout.write(f"# ranks share namespaces: {'yes, job ' + key if key else 'no'}\n")
        return 0
    p.warn(opts.prog, environ)
    if key is None:
        execute(p)
        return 1
    tail = join_shared(p, key, environ, signature, locked, opts.cleanenv)
    execute(tail)
    return 1


def rank_plan(opts, image, site, environ, shared=True):
    """The launch plan of one rank (the launcher makes the same one to prepare the
    node's container before the ranks start)."""
    from hpcimage.runtime import plan as launch
    env = dict(environ)
    env.update(rank_environ(environ))
    if not shared:
        for k, v in NO_CMA.items():
            env.setdefault(k, v)
    extra = [d for d in pmix_dirs(environ)]
    contributions = []
    mode = opts.mpi_mode or (site.get("mpi") or {}).get("mode") or "hybrid"
    if mode == "bind":
        contributions.append(bind_contribution(site, environ, opts.args[0] if opts.args else ""))
    return launch.plan(opts, image, site, env, extra_binds=extra,
                       keep_prefixes=FORWARD_PREFIXES, contributions=contributions)


# Launcher options after which the ranks' working directory differs from ours.
WDIR_OPTS = ("-wdir", "--wdir", "-D", "--chdir", "-wd")


def prepare(argv2, env, site, mode, ours, program, launcher_opts):
    """Outside Slurm: set up this node's shared container for the job while mpirun
    starts, so that every local rank, the first included, only joins it (hpcimage-join).
    Adds HPCIMAGE_MPI_KEY to env (and `-x` for Open MPI); returns the new argv, or argv2
    unchanged when the ranks should prepare it themselves.

    Not under srun: Slurm's PMIx server directory (PMIX_SERVER_TMPDIR, per step, bound
    into the container) exists only once the step has started, so the node's first
    rank sets the container up; the others join it."""
    if (argv2[0].endswith("srun") or not join_helper(env) or "--contain" in ours
            or any(o.split("=")[0] in WDIR_OPTS for o in launcher_opts)
            or env.get("HPCIMAGE_MPI_PREPARE", "1") == "0"):
        return argv2
    from hpcimage.runtime import plan as launch, localcopy as local, options
    from hpcimage.image import open_image
    rest = ["--mpi-mode", mode, *ours, "--", *program]
    key = f"launch-{os.uname().nodename}-{os.getpid()}-{os.urandom(3).hex()}"
    env["HPCIMAGE_MPI_KEY"] = key
    opts = options.parse(["image-mpi-rank", *rest], env)
    opts.prog = "image-mpi"
    opts.image = local.choose(opts.image, site, env)
    signature = rank_signature(rest, opts)
    if signature is None:
        del env["HPCIMAGE_MPI_KEY"]
        return argv2
    p = rank_plan(opts, open_image(opts.image), site, env)
    head, tail = launch.split(p, "chdir")
    rec = Recipe(tail, env, signature, os.getcwd(), opts.cleanenv)
    if not rec.ok:
        del env["HPCIMAGE_MPI_KEY"]
        return argv2
    p.warn(opts.prog, env)
    base = _state_base()
    state = os.path.join(base, key)
    refs_path = os.path.join(state, "refs")
    m = os.open(base, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    fcntl.flock(m, fcntl.LOCK_EX)          # the ranks wait here until the holder is up
    os.mkdir(state, 0o700)
    open(refs_path, "a").close()
    refs = os.open(refs_path, os.O_RDONLY)
    fcntl.flock(refs, fcntl.LOCK_SH)       # mpirun keeps it (inherited): the holder
    os.set_inheritable(refs, True)         # stays until mpirun and every rank are gone
    sys.stdout.flush()
    sys.stderr.flush()
    middle = os.fork()
    if middle == 0:                        # not mpirun's child: fork again and leave
        try:
            if os.fork() == 0:
                try:
                    os.close(refs)
                    pid, rec.final = _start_holder(head, state, refs_path, (m,),
                                                   _warm_arg(tail), rec.probe_args())
                    tmp = os.path.join(state, "holder.tmp")
                    with open(tmp, "w") as f:
                        f.write(str(pid))
                    os.rename(tmp, os.path.join(state, "holder"))
                    _write_recipe(state, rec.encode())
                    fcntl.flock(m, fcntl.LOCK_UN)
                except BaseException as e:       # the ranks set it up (and report)
                    if os.environ.get("HPCIMAGE_TRACE") == "1":
                        os.write(2, f"hpcimage: prepare: {e}\n".encode())
                finally:
                    os._exit(0)            # leaves the lock (shared with the parent)
        finally:
            os._exit(0)
    os.waitpid(middle, 0)
    os.close(m)                            # the worker holds the lock now
    impl = (site.get("mpi") or {}).get("implementation") or implementation_of(argv2[0])
    if impl == "openmpi":
        argv2 = [argv2[0], "-x", "HPCIMAGE_MPI_KEY"] + argv2[1:]
    return argv2


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
        from hpcimage.runtime import localcopy as local
        opts.image = local.choose(opts.image, site, environ)   # image-update's copy
        return run_rank(opts, open_image(opts.image), site, environ,
                        wrapper_signature(argv[1:], opts))
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
        from hpcimage.runtime.plan import quote
        sys.stdout.write(" ".join(quote(a) for a in argv2) + "\n")
        return 0
    argv2 = prepare(argv2, env, site, mode, ours, program, rest)
    sys.stdout.flush()
    # argv[0] as a user types it: Open MPI's mpirun started by an absolute path acts as
    # with --prefix and prepends its directories to the ranks' PATH and LD_LIBRARY_PATH.
    exe, argv2 = argv2[0], [os.path.basename(argv2[0])] + argv2[1:]
    procstate.for_exec()
    try:
        os.execve(exe, argv2, env)
    except OSError as e:
        raise HpcimageError(f"image-mpi: cannot start {exe}: {e.strerror}") from None


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
