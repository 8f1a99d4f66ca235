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
import sys

from hpcimage.errors import HpcimageError, UsageError
from hpcimage.linux import procstate
from hpcimage.runtime.options import FLAGS, HELP_WORDS, IMAGE_MPI
from hpcimage.runtime.mpi.jobenv import is_rank
from hpcimage.runtime.mpi.recipe import Recipe, write_recipe, join_helper
from hpcimage.runtime.mpi.shared import (head_digest, start_holder, state_base, state_name,
                                         warm_arg, write_head)
from hpcimage.runtime.mpi.rank import (rank_plan, rank_signature, run_rank, wrapper_signature,
                                       resolve as rank_request)


# The launcher's options (srun's, mpirun's) that take a value (the next argument), so that
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
    policy = site.mpi or {}
    kind = launcher_kind(environ, policy)[0]
    from hpcimage.linux.paths import which
    exe = which(kind, environ.get("PATH") or "/usr/bin:/bin")
    if exe is None:
        raise HpcimageError(f"launcher {kind!r} not found on PATH"
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
            or "--containall" in ours
            or any(o.split("=")[0] in WDIR_OPTS for o in launcher_opts)
            or env.get("HPCIMAGE_MPI_PREPARE", "1") == "0"):
        return argv2
    from hpcimage.runtime import plan as launch, options
    from hpcimage.runtime.ops import Chdir
    rest = ["--mpi-mode", mode, *ours, "--", *program]
    key = f"launch-{os.uname().nodename}-{os.getpid()}-{os.urandom(3).hex()}"
    env["HPCIMAGE_MPI_KEY"] = key
    opts = options.parse(["image-mpi-rank", *rest], env)
    signature = rank_signature(rest, opts)
    if signature is None:
        del env["HPCIMAGE_MPI_KEY"]
        return argv2
    p = rank_plan(rank_request(opts, site, env))
    head, tail = launch.split(p, Chdir)
    rec = Recipe(tail, env, signature, os.getcwd(), opts.cleanenv)
    if not rec.ok:
        del env["HPCIMAGE_MPI_KEY"]
        return argv2
    p.warn(opts.prog, env)
    base = state_base()
    state = os.path.join(base, state_name(key))
    refs_path = os.path.join(state, "refs")
    m = os.open(base, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    fcntl.flock(m, fcntl.LOCK_EX)          # the ranks wait here until the holder is up
    os.mkdir(state, 0o700)
    write_head(state, head_digest(head))
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
                    pid, rec.final = start_holder(head, state, refs_path, (m,),
                                                   warm_arg(tail), rec.probe_args())
                    tmp = os.path.join(state, "holder.tmp")
                    with open(tmp, "w") as f:
                        f.write(str(pid))
                    os.rename(tmp, os.path.join(state, "holder"))
                    write_recipe(state, rec.encode())
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
    impl = (site.mpi or {}).get("implementation") or implementation_of(argv2[0])
    if impl == "openmpi":
        argv2 = [argv2[0], "-x", "HPCIMAGE_MPI_KEY"] + argv2[1:]
    return argv2


# image-mpi's own words (name -> takes a value), from the runtime's flag table: the
# runtime options that reach every rank, --mpi-mode, --dry-run and --launcher. The
# table's short forms and --app are the launcher's (options.LAUNCHERS).
OUR_LONG = IMAGE_MPI


def main(argv, environ, site):
    """`image-mpi ...`: rank side when started by a launcher, else start the launcher."""
    from hpcimage.runtime import options
    if is_rank(environ):
        opts = options.parse(["image-mpi-rank", *argv[1:]], environ)
        refuse_for_ranks(opts)
        return run_rank(opts, site, environ, wrapper_signature(argv[1:], opts))
    args = argv[1:]
    if args[:1] and args[0] in HELP_WORDS:
        sys.stdout.write(help_text())
        return 0
    if not environ.get("HPCIMAGE_IMAGE"):
        raise UsageError("no image module loaded: run 'module load "
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
        raise UsageError("no program given (usage: image-mpi [OPTIONS] "
                         "[LAUNCHER OPTIONS] [--] PROGRAM [ARGS...])")
    # what the ranks would refuse (and their variables), said once here
    refuse_for_ranks(options.parse(["image-mpi-rank", *ours, "--", *program], environ))
    mode = mode or site.mpi_setting("mode")
    if mode not in ("hybrid", "bind"):
        raise UsageError(f"--mpi-mode wants hybrid or bind, not {mode!r}")
    env = dict(environ)
    if launcher:
        env["HPCIMAGE_MPI_LAUNCHER"] = launcher
    argv2 = launcher_argv(rest, env, site, mode, ours, program)
    if not argv2[0].endswith("srun"):
        # Open MPI 4.1 loses track of exits when it starts 32+ local ranks from threads.
        env.setdefault("OMPI_MCA_odls_base_max_threads", "0")
    if dry:
        from hpcimage.runtime.ops import quote
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
        raise HpcimageError(f"cannot start {exe}: {e.strerror}") from None


# Options of image-exec that image-mpi's ranks cannot have: the ranks of a node share
# one container (its namespaces), and a PID namespace of one's own would cut a rank off
# its neighbours (shared memory transports address each other by PID).
RANKS_REFUSE = ("pid", "ipc", "uts", "hostname")


def refuse_for_ranks(opts):
    for attr in RANKS_REFUSE:
        if getattr(opts, attr):
            name = "--" + attr
            if opts.containall and attr in ("pid", "ipc"):
                name = "--containall (-C) includes --" + attr + ", which"
            raise UsageError(f"{name} is not supported by image-mpi: the ranks of a node "
                             "share one container")


# The runtime options every rank gets, listed from the runtime's flag table (FLAGS).
RANK_OPTIONS = tuple(row[0] for row in FLAGS if row[3] == "ranks"
                     and row[1] not in RANKS_REFUSE + ("containall", "compat", "no_init"))

HELP_HEAD = """\
usage: image-mpi [OPTIONS] [LAUNCHER OPTIONS] [--] PROGRAM [ARGS...]

Starts PROGRAM from the loaded image once per MPI rank: with srun inside a Slurm
allocation, with the host's mpirun outside (`srun image-mpi PROGRAM` works too).
Launcher options pass through (image-mpi -n 4 --map-by core ./solver); put `--`
before PROGRAM when an option is not recognised as taking a value. Short forms
(-B, -e, -c, ...) are the launcher's: use the long ones.

options:
  --mpi-mode hybrid|bind   hybrid: the image's MPI, wired to the host through PMIx/PMI;
                           bind: the host's MPI library bound into the image
  --launcher srun|mpirun   choose the launcher
  --dry-run                print the launcher command line and exit

runtime options, as for image-exec, for every rank:
"""


def help_text():
    from hpcimage.runtime.options import format_rows, help_rows
    return HELP_HEAD + format_rows(help_rows(RANK_OPTIONS, shorts=False), 26)
