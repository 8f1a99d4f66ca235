"""Command line of the runtime (`image-exec`, `hpcimage exec`, ...), parsed by hand.

Flags follow Apptainer's where they mean the same thing. Options stop at the first
argument that is not an option (the image, or with image-* wrappers the command),
so everything after it reaches the container verbatim. Standard library only.
"""
import os

from hpcimage.errors import UsageError

VERBS = ("exec", "run", "shell", "test")
WRAPPER_VERBS = {"image-exec": "exec", "image-run": "run", "image-shell": "shell",
                 "image-mpi-rank": "exec"}
MPI_MODES = ("hybrid", "bind")

HELP = """\
usage: {prog} [OPTIONS] {image}{what}

options (as Apptainer's where they mean the same):
  -B, --bind SRC[:DST[:OPTS]]   bind a host path into the container (repeatable,
                                comma-separated lists; OPTS: ro, rw, image-src=PATH,
                                id=N; '\\,' and '\\:' are a literal ',' and ':')
  -e, --cleanenv                start from a minimal environment (see README)
  -C, --contain                 no host home, cwd or /tmp: fresh empty ones instead
      --no-home                 do not bind the home directory
      --no-mount LIST           leave out default mounts: proc, sys, dev, devpts, home,
                                tmp, hostfs, cwd, bind-paths, or a bind's path
      --pwd DIR                 working directory inside the container
      --env K=V                 set K inside the container (repeatable)
      --env-file FILE           set the variables FILE sets (sh syntax)
      --no-eval                 take --env, --env-file, *ENV_X values literally
      --app NAME                the SCI-F app NAME: its runscript (run), its environment
      --nv, --rocm              NVIDIA / AMD GPUs: device nodes and driver libraries
      --ib                      InfiniBand/RDMA devices and verbs libraries
      --dry-run                 print the launch plan and exit
  -h, --help                    this help
"""


def valid_name(k):
    """An environment variable name: [A-Za-z_][A-Za-z0-9_]* (no re: hot path)."""
    return bool(k) and (k[0] == "_" or ("a" <= k[0].lower() <= "z")) and all(
        c == "_" or ("a" <= c.lower() <= "z") or "0" <= c <= "9" for c in k)


class Options:
    __slots__ = ("verb", "prog", "image", "args", "binds", "cleanenv", "contain",
                 "no_home", "pwd", "env", "dry_run", "app", "nv", "rocm", "ib", "mpi_mode",
                 "no_mount", "env_file", "no_eval")

    def __init__(self, verb, prog):
        self.verb = verb
        self.prog = prog
        self.image = None
        self.args = []
        self.binds = []
        self.cleanenv = False
        self.contain = False
        self.no_home = False
        self.pwd = None
        self.env = []
        self.dry_run = False
        self.app = None
        self.nv = False
        self.rocm = False
        self.ib = False
        self.mpi_mode = None
        self.no_mount = []
        self.env_file = None
        self.no_eval = False


# The options: one table, read by parse() below, by image-mpi's split of its own options
# from the launcher's (mpi/launcher.py) and, through the recipe (mpi/recipe.py), by
# hpcimage-join (mpi/join.c). Adding a row reaches all three.
#
# A row: (name, Options attribute, takes a value, what `image-mpi NAME` does with it):
#   "ranks"     ours: passed to every rank
#   "image-mpi" image-mpi's own (the mode of the ranks, --dry-run prints the launcher line)
#   "launcher"  the launcher's: a short form or a name srun/mpirun also use (srun's -e is
#               --error, -C --constraint, -B --extra-node-info; mpirun's --app an app file)
FLAGS = (
    ("-B", "bind", True, "launcher"),
    ("--bind", "bind", True, "ranks"),
    ("-e", "cleanenv", False, "launcher"),
    ("--cleanenv", "cleanenv", False, "ranks"),
    ("-C", "contain", False, "launcher"),
    ("--contain", "contain", False, "ranks"),
    ("--no-home", "no_home", False, "ranks"),
    ("--no-mount", "no_mount", True, "ranks"),
    ("--pwd", "pwd", True, "ranks"),
    ("--env", "env", True, "ranks"),
    ("--env-file", "env_file", True, "ranks"),
    ("--no-eval", "no_eval", False, "ranks"),
    ("--app", "app", True, "launcher"),
    ("--nv", "nv", False, "ranks"),
    ("--rocm", "rocm", False, "ranks"),
    ("--ib", "ib", False, "ranks"),
    ("--dry-run", "dry_run", False, "image-mpi"),
    ("--mpi-mode", "mpi_mode", True, "image-mpi"),
)

HELP_WORDS = ("-h", "--help")

# The parser's view: switches (no value) and valued options, name -> attribute. A valued
# short option also takes its value attached (-B/a,/b).
SWITCHES = {name: attr for name, attr, valued, _ in FLAGS if not valued}
VALUED = {name: attr for name, attr, valued, _ in FLAGS if valued}
ATTACHED = tuple(name for name in VALUED if len(name) == 2)

# image-mpi's view: its words (name -> takes a value); every other option word is the
# launcher's. --launcher is image-mpi's alone (not a runtime option).
IMAGE_MPI_ONLY = {"--launcher": True}
IMAGE_MPI = dict({name: valued for name, _, valued, where in FLAGS if where != "launcher"},
                 **IMAGE_MPI_ONLY)
LAUNCHERS = frozenset(name for name, _, _, where in FLAGS if where == "launcher")

_FLAGS = SWITCHES
_VALUED = VALUED


def parse(argv, environ=None):
    """argv[0] is the verb: exec|run|shell or image-exec|image-run|image-shell."""
    environ = os.environ if environ is None else environ
    if not argv:
        raise UsageError("usage: python -m hpcimage.runtime VERB [OPTIONS] ...")
    verb = argv[0]
    from_env = verb in WRAPPER_VERBS
    if from_env:
        prog, verb = verb, WRAPPER_VERBS[verb]
    elif verb in VERBS:
        prog = f"hpcimage {verb}"
    else:
        raise UsageError(f"unknown verb {verb!r} (exec, run, shell, test)")
    # image-mpi-rank: the ranks of image-mpi, which speaks for them
    o = Options(verb, "image-mpi" if prog == "image-mpi-rank" else prog)
    rest = argv[1:]
    i = 0
    while i < len(rest):
        a = rest[i]
        if a == "--":
            i += 1
            break
        if a in HELP_WORDS:
            o.args = ["--help"]
            return o
        if not a.startswith("-") or a == "-":
            break
        name, eq, val = a.partition("=")
        if name in _FLAGS and not eq:
            setattr(o, _FLAGS[name], True)
            i += 1
            continue
        if name in _VALUED or (a[:2] in ATTACHED and len(a) > 2):
            if name not in _VALUED:                     # -B/a,/b
                name, val = a[:2], a[2:]
            elif not eq:
                if name.startswith("--") or len(a) == 2:
                    if i + 1 >= len(rest):
                        raise UsageError(f"option {name} needs a value")
                    val = rest[i + 1]
                    i += 1
            key = _VALUED[name]
            if key == "bind":
                from hpcimage.config.bindspec import split_list
                o.binds.extend(split_list(val))
            elif key == "no_mount":
                o.no_mount.extend(v for v in val.split(",") if v)
            elif key == "env":
                k, has, v = val.partition("=")
                if not has or not valid_name(k):
                    raise UsageError(f"--env wants NAME=VALUE, got {val!r}")
                o.env.append((k, v))
            elif key == "mpi_mode" and val not in MPI_MODES:
                raise UsageError(f"--mpi-mode wants hybrid or bind, not {val!r}")
            else:
                setattr(o, key, val)
            i += 1
            continue
        if verb in ("shell", "run") and from_env:
            break       # image-shell -c '...', image-run --flag: the rest is theirs
        name = a.split("=", 1)[0] if a.startswith("--") else a     # as click says it
        raise UsageError(f"no such option: {name} (see '{prog} --help')")
    rest = rest[i:]
    if from_env:
        o.image = environ.get("HPCIMAGE_IMAGE") or None
        if not o.image:
            raise UsageError("no image module loaded: run 'module load "
                             "<Name/version>' first ('module avail' lists the images)")
    else:
        if not rest:
            raise UsageError(f"no image given (usage: {prog} [OPTIONS] IMAGE ...)")
        o.image, rest = rest[0], rest[1:]
    if verb == "exec" and not rest:
        raise UsageError(f"no command given (usage: {prog} [OPTIONS] "
                         f"{'' if from_env else 'IMAGE '}COMMAND [ARGS...])")
    o.args = rest
    return o


def usage(o):
    what = {"exec": "COMMAND [ARGS...]", "run": "[ARGS...]", "shell": "[SHELL ARGS...]",
            "test": "[ARGS...]"}
    image = "" if o.prog.startswith("image-") else "IMAGE "
    return HELP.format(prog=o.prog, image=image, what=what[o.verb])
