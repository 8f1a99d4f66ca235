"""The recipe a job's holder writes for hpcimage-join (join.c): what a rank after the
first on a node needs to join without Python; where the joiner is. Standard library
only."""
import os

from hpcimage.errors import EXIT_FAILED, EXIT_USAGE
from hpcimage.runtime.options import SWITCHES, VALUED
from hpcimage.runtime.mpi.jobenv import FORWARD_PREFIXES, PMIX_TRANSLATE


# The recipe's format: join.c reads this one only (its FORMAT); change both together.
# 2: the runtime's option table and the joiner's messages (1: neither).
FORMAT = 2
MAGIC = b"HPCIMAGE-RECIPE %d" % FORMAT

# What the joiner says when it cannot go on, in the Python rank's words (main.py's
# "PROG: error: "; environ.NOT_RUNNABLE, command.BAD_PWD): name -> (exit status, text).
# The joiner fills {cmd} (the program), {path} (PATH), {dir}, {ns} and {error} (strerror).
ERROR_LABEL = "image-mpi"
JOINER_ONLY = {
    "setns": (EXIT_FAILED, "joining the node's shared container: setns({ns}): {error}"),
    "chdir": (EXIT_FAILED, "chdir /: {error}"),
}


def messages():
    from hpcimage.runtime.command import BAD_PWD
    from hpcimage.runtime.environ import NOT_RUNNABLE
    out = {name: (status, "{cmd}: " + text) for name, (status, text) in NOT_RUNNABLE.items()}
    out["bad_pwd"] = (EXIT_USAGE, BAD_PWD)
    out.update(JOINER_ONLY)
    return out


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
    """The compiled per-rank joiner (hpcimage/runtime/mpi/join.c, built at install time when
    a C compiler is there), or None: then every rank is a Python runtime."""
    if environ.get("HPCIMAGE_MPI_JOIN", "1") == "0" or environ.get("HPCIMAGE_MPI_SHARE") == "0":
        return None
    return JOIN_HELPER if os.access(JOIN_HELPER, os.X_OK) else None


class Recipe:
    """What hpcimage-join needs to do what a rank's `tail` (chdir, exec) does, for any
    rank of the job. environ: the planning environment (a rank's, or the launcher's)."""

    def __init__(self, tail, environ, signature, cwd, cleanenv=False, error_label=ERROR_LABEL,
                 vary=None):
        from hpcimage.runtime import environ as envmod
        from hpcimage.runtime.command import label
        from hpcimage.runtime.ops import Chdir, Exec
        c_op, e_op = tail.ops[0], tail.ops[1]
        self.workdir, self.home, self.explicit = c_op.workdir, c_op.home, c_op.explicit
        env, forced, prepend, append = e_op.env, e_op.forced, e_op.prepend, e_op.append
        self.prog = e_op.prog
        late = getattr(e_op, "late", None)
        # the joiner runs the shell only where the image has env scripts: values to
        # evaluate (or an --env-file) in an image without them need the Python rank
        self.ok = (type(c_op) is Chdir and type(e_op) is Exec and e_op.verb == "exec"
                   and e_op.app is None and e_op.rcfile is None
                   and not envmod.needs_shell(forced, late))
        self.direct = envmod.direct_env(env, forced, prepend, append, late)
        self.shell = envmod.shell_env(env, forced, prepend, append, label(self.prog),
                                      late=late)
        self.script = (envmod.shell_prologue(forced, prepend, append, None, late)
                       + envmod.SHELL_EXEC)
        if vary is None:        # an MPI rank's
            self.vary = tuple(VARY_PREFIXES) + (() if cleanenv else LAUNCHER_EXTRA)
            self.ignore = LAUNCHER_EXTRA if cleanenv else ()
        else:                   # a warm start's (runtime.warm): nothing may differ
            self.vary, self.ignore = tuple(vary), ()
        self.error_label = error_label    # "PROG: error: " of the joiner's messages
        self.extra = []         # more (key, value) items: runtime.warm's checks
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
    """The recipe file's bytes: MAGIC NUL, then KEY NUL VALUE NUL pairs (a list repeats
    its key)."""
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
    items += [(b"switch", enc(n)) for n in SWITCHES]      # the runtime's option table
    items += [(b"valued", enc(n)) for n in VALUED]
    items += [(b"message", enc(f"{name}\x1f{status}\x1f{getattr(r, 'error_label', ERROR_LABEL)}: error: {text}"))
              for name, (status, text) in messages().items()]
    items += [(b"host", enc(f"{k}={v}")) for k, v in environ.items()
              if not varies(k) and not f"{k}=".startswith(ignore or ("\0",))]
    items += [(b"out", enc(f"{k}={v}")) for k, v in direct.items()]
    items += [(b"sh_out", enc(f"{k}={v}")) for k, v in shell.items()]
    if r.final is not None:         # the env scripts' result (the holder's probe)
        items += [(b"final", enc(f"{k}={v}")) for k, v in r.final.items()]
        items += [(b"final_keep", enc(k)) for k, v in r.final.items()
                  if varies(k) and environ.get(k) != v]
    items += [(enc(k), enc(v)) for k, v in getattr(r, "extra", ())]
    if any(b"\0" in v for _, v in items):
        return None
    return MAGIC + b"\0" + b"".join(k + b"\0" + v + b"\0" for k, v in items)


def write_recipe(state, data):
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
