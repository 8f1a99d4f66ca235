"""Command line of the runtime (`image-exec`, `hpcimage exec`, ...), parsed by hand.

Flags follow Apptainer's where they mean the same thing (docs/apptainer.md, section
flags). Options stop at the first argument that is not an option (the image, or with
image-* wrappers the command), so everything after it reaches the container verbatim.
Short switches combine (-eC). Each option's APPTAINER_*/SINGULARITY_* variable applies
where the command line leaves it unset (`from_environ`). An Apptainer option hpcimage
lacks is refused by name (UNSUPPORTED), never "unknown". Standard library only.
"""
import os

from hpcimage.errors import UsageError

VERBS = ("exec", "run", "shell", "test")
WRAPPER_VERBS = {"image-exec": "exec", "image-run": "run", "image-shell": "shell",
                 "image-mpi-rank": "exec"}
MPI_MODES = ("hybrid", "bind")


def valid_name(k):
    """An environment variable name: [A-Za-z_][A-Za-z0-9_]* (no re: hot path)."""
    return bool(k) and (k[0] == "_" or ("a" <= k[0].lower() <= "z")) and all(
        c == "_" or ("a" <= c.lower() <= "z") or "0" <= c <= "9" for c in k)


class Options:
    __slots__ = ("verb", "prog", "image", "args", "binds", "cleanenv", "contain",
                 "containall", "no_home", "home", "pwd", "env", "env_file", "no_eval",
                 "no_mount", "no_umask", "scratch", "workdir", "pid", "ipc", "uts",
                 "hostname", "no_init", "compat", "dry_run", "app", "nv", "rocm", "ib",
                 "mpi_mode", "instance", "warnings", "given",
                 "fakeroot", "writable", "overlays", "passphrase", "pem_path", "writable_tmpfs")

    def __init__(self, verb, prog):
        self.verb = verb
        self.prog = prog
        self.image = None
        self.args = []
        self.binds = []          # raw bind specs (-B, then the *_BIND variables)
        self.cleanenv = False
        self.contain = False
        self.containall = False
        self.no_home = False
        self.home = None         # -H SRC[:DST] as given
        self.pwd = None
        self.env = []
        self.env_file = None
        self.no_eval = False
        self.no_mount = []       # names as given, comma lists split
        self.no_umask = False
        self.scratch = []
        self.workdir = None
        self.pid = False
        self.ipc = False
        self.uts = False
        self.hostname = None
        self.no_init = False
        self.compat = False
        self.dry_run = False
        self.app = None
        self.nv = False
        self.rocm = False
        self.ib = False
        self.mpi_mode = None
        self.instance = None     # --instance NAME: the image word is instance://NAME
        self.given = {}          # what the command line set: attribute -> the word used
        self.passphrase = False  # encrypted images (runtime/crypt.py)
        self.pem_path = None
        self.writable_tmpfs = False
        self.warnings = []       # said before the launch (plan.warnings)
        self.fakeroot = False    # root inside (subordinate ids, else a single id)
        self.writable = False    # a sandbox directory mounted read-write
        self.overlays = []       # raw --overlay specs PATH[:ro] in order (+ the personal overlay)


# The options: one table, read by parse() below, by usage() (the help), by image-mpi's
# split of its own options from the launcher's (mpi/launcher.py, and its help) and,
# through the recipe (mpi/recipe.py), by hpcimage-join (mpi/join.c); docs/apptainer.md
# is checked against it (tests/test_apptainer_docs.py). Adding a row reaches them all.
#
# A row: (name, Options attribute, takes a value, what `image-mpi NAME` does with it,
#         Apptainer's variable names without APPTAINER_/SINGULARITY_, help):
#   "ranks"     ours: passed to every rank
#   "image-mpi" image-mpi's own (the mode of the ranks, --dry-run prints the launcher line)
#   "launcher"  the launcher's: a short form or a name srun/mpirun also use (srun's -e is
#               --error, -C --constraint, -B --extra-node-info, -c --cpus-per-task,
#               -p --partition, -i --input, -S --core-spec, -W --wait; mpirun's -H
#               the hosts, --app an app file)
#   help: (METAVAR, text) on the long form (its short forms are found by attribute),
#         None for a short form or a synonym listed with its twin.
FLAGS = (
    ("-B", "bind", True, "launcher", (), None),
    ("--bind", "bind", True, "ranks", ("BIND", "BINDPATH"),
     ("SRC[:DST[:OPTS]]", "bind a host path into the container (repeatable, comma-"
      "separated lists; OPTS: ro, rw, image-src=PATH, id=N; '\\,' and '\\:' are a "
      "literal ',' and ':')")),
    ("-e", "cleanenv", False, "launcher", (), None),
    ("--cleanenv", "cleanenv", False, "ranks", ("CLEANENV",),
     ("", "start from a minimal environment (see README)")),
    ("-c", "contain", False, "launcher", (), None),
    ("--contain", "contain", False, "ranks", ("CONTAIN",),
     ("", "minimal /dev; fresh empty home, /tmp, /var/tmp; no cwd bind")),
    ("-C", "containall", False, "launcher", (), None),
    ("--containall", "containall", False, "ranks", ("CONTAINALL",),
     ("", "--contain, --cleanenv, --pid and --ipc")),
    ("-H", "home", True, "launcher", (), None),
    ("--home", "home", True, "ranks", ("HOME",),
     ("SRC[:DST]", "bind SRC as the home directory, at DST (default SRC)")),
    ("--no-home", "no_home", False, "ranks", ("NO_HOME",),
     ("", "do not bind the home directory")),
    ("--pwd", "pwd", True, "ranks", ("PWD", "TARGET_PWD"), None),
    ("--cwd", "pwd", True, "ranks", ("CWD", "TARGET_CWD"),
     ("DIR", "working directory inside the container")),
    ("--env", "env", True, "ranks", (),
     ("K=V", "set K inside the container (repeatable)")),
    ("--env-file", "env_file", True, "ranks", ("ENV_FILE",),
     ("FILE", "set the variables of FILE inside the container")),
    ("--no-eval", "no_eval", False, "ranks", ("NO_EVAL",),
     ("", "take --env, --env-file and *ENV_* values literally")),
    ("--no-mount", "no_mount", True, "ranks", ("NO_MOUNT",),
     ("LIST", "leave out default mounts: proc, sys, dev, devpts, home, tmp, "
       "hostfs, cwd, bind-paths, or a bind's path")),
    ("--no-umask", "no_umask", False, "ranks", ("NO_UMASK",),
     ("", "umask 0022 in the container instead of the caller's")),
    ("-S", "scratch", True, "launcher", (), None),
    ("--scratch", "scratch", True, "ranks", ("SCRATCH", "SCRATCHDIR"),
     ("DIR", "an empty writable DIR in the container (repeatable; -W keeps it)")),
    ("-W", "workdir", True, "launcher", (), None),
    ("--workdir", "workdir", True, "ranks", ("WORKDIR",),
     ("DIR", "host directory behind --scratch, and /tmp, /var/tmp, home "
      "with --contain")),
    ("-p", "pid", False, "launcher", (), None),
    ("--pid", "pid", False, "ranks", ("PID", "UNSHARE_PID"),
     ("", "new PID namespace (a small init is PID 1; see --no-init)")),
    ("-i", "ipc", False, "launcher", (), None),
    ("--ipc", "ipc", False, "ranks", ("IPC", "UNSHARE_IPC"),
     ("", "new IPC namespace")),
    ("--uts", "uts", False, "ranks", ("UTS", "UNSHARE_UTS"),
     ("", "new UTS namespace (the host's hostname, changeable inside)")),
    ("--hostname", "hostname", True, "ranks", ("HOSTNAME",),
     ("NAME", "the container's hostname (new UTS namespace)")),
    ("--no-init", "no_init", False, "ranks", ("NOSHIMINIT",),
     ("", "with --pid: the command itself is PID 1")),
    ("--compat", "compat", False, "ranks", ("COMPAT",),
     ("", "--containall --no-init --no-umask --no-eval --writable-tmpfs")),
    ("--app", "app", True, "launcher", ("APP", "APPNAME"),
     ("NAME", "the SCI-F app NAME: its runscript (run), its environment")),
    ("--nv", "nv", False, "ranks", ("NV",),
     ("", "NVIDIA GPUs: device nodes and driver libraries")),
    ("--rocm", "rocm", False, "ranks", ("ROCM",),
     ("", "AMD GPUs: device nodes and driver libraries")),
    ("--ib", "ib", False, "ranks", (),
     ("", "InfiniBand/RDMA devices and verbs libraries")),
    ("-f", "fakeroot", False, "launcher", (), None),
    ("--fakeroot", "fakeroot", False, "ranks", ("FAKEROOT",),
     ("", "root inside: ids mapped through /etc/subuid and /etc/subgid (else only "
      "yours, with a warning); HOME=/root")),
    ("-w", "writable", False, "launcher", (), None),
    ("--writable", "writable", False, "ranks", ("WRITABLE",),
     ("", "a sandbox directory you can write: mounted read-write; a SIF: its overlay "
      "partition")),
    ("-o", "overlays", True, "launcher", (), None),
    ("--overlay", "overlays", True, "ranks", ("OVERLAY", "OVERLAYIMAGE"),
     ("PATH[:ro]", "an overlay: a directory, an ext3 image, a SquashFS file, a SIF's "
      "overlay partition (repeatable; one writable, on top; docs/overlays.md)")),
    ("--writable-tmpfs", "writable_tmpfs", False, "ranks", ("WRITABLE_TMPFS",),
     ("", "a writable tmpfs layer (64 MiB; site.yaml writable_tmpfs_size), gone at the end")),
    ("--passphrase", "passphrase", False, "ranks", (),
     ("", "an encrypted image's passphrase, asked on the terminal (else "
      "APPTAINER_ENCRYPTION_PASSPHRASE)")),
    ("--pem-path", "pem_path", True, "ranks", ("ENCRYPTION_PEM_PATH",),
     ("FILE", "an encrypted image's key: a PKCS#1 RSA private key (PEM)")),
    ("--dry-run", "dry_run", False, "image-mpi", (),
     ("", "print the launch plan and exit")),
    ("--mpi-mode", "mpi_mode", True, "image-mpi", (), None),
    ("--instance", "instance", True, "image-mpi", (),
     ("NAME", "run in the running instance NAME (as instance://NAME; docs/instances.md)")),
)

# Apptainer 1.3/1.4 action options (exec, run, shell) that hpcimage does not have:
# name -> Apptainer's variable names (the *_NAME that warns). "yet": coming with the
# fakeroot issue. Short forms: UNSUPPORTED_SHORT. The registry
# options' variables (APPTAINER_DOCKER_USERNAME, _AUTHFILE, _NO_HTTPS, _DISABLE_CACHE)
# do not warn: users export them for `pull` and `build`, which are not launches.
UNSUPPORTED = {
    "--add-caps": ("ADD_CAPS",), "--allow-setuid": ("ALLOW_SETUID",),
    "--apply-cgroups": ("APPLY_CGROUPS",), "--authfile": (),
    "--blkio-weight": ("BLKIO_WEIGHT",), "--blkio-weight-device": ("BLKIO_WEIGHT_DEVICE",),
    "--boot": ("BOOT",), "--containlibs": ("CONTAINLIBS",), "--cpu-shares": ("CPU_SHARES",),
    "--cpus": (), "--cpuset-cpus": ("CPUSET_CPUS",), "--cpuset-mems": ("CPUSET_MEMS",),
    "--disable-cache": (), "--dmtcp-launch": ("DMTCP_LAUNCH",),
    "--dmtcp-restart": ("DMTCP_RESTART",), "--dns": ("DNS",),
    "--docker-host": (), "--docker-login": (),
    "--docker-password": (), "--docker-username": (),
    "--drop-caps": ("DROP_CAPS",),
    "--fusemount": ("FUSESPEC",), "--ignore-fakeroot-command": ("IGNORE_FAKEROOT_COMMAND",),
    "--ignore-subuid": ("IGNORE_SUBUID",), "--ignore-userns": ("IGNORE_USERNS",),
    "--keep-privs": ("KEEP_PRIVS",), "--memory": ("MEMORY",),
    "--memory-reservation": ("MEMORY_RESERVATION",), "--memory-swap": ("MEMORY_SWAP",),
    "--mount": ("MOUNT",), "--net": ("NET", "UNSHARE_NET"), "--network": ("NETWORK",),
    "--network-args": ("NETWORK_ARGS",), "--no-https": (), "--nohttps": (),
    "--no-nv": ("NV_OFF", "NO_NV"), "--no-privs": ("NO_PRIVS",),
    "--no-rocm": ("ROCM_OFF", "NO_ROCM"), "--nvccli": ("NVCCLI",),
    "--oom-kill-disable": ("OOM_KILL_DISABLE",),
    "--pids-limit": ("PIDS_LIMIT",),
    "--security": ("SECURITY",), "--sharens": ("SHARENS",), "--shell": (),
    "--underlay": ("UNDERLAY",), "--unsquash": ("UNSQUASH",),
    "--userns": ("USERNS", "UNSHARE_USERNS"),
}
UNSUPPORTED_SHORT = {"-n": "--net", "-s": "--shell", "-u": "--userns"}
NOT_YET = ()

HELP_WORDS = ("-h", "--help")

# image-shell and image-run have no image word to end the options: of the short forms
# only these are theirs; -c, -i, -p, ... reach the shell (image-shell -c 'echo hi') or
# the runscript, as every word after the first that is not an option of ours.
WRAPPER_SHORTS = ("-B", "-e", "-C")

# The parser's view: switches (no value) and valued options, name -> attribute. A valued
# short option also takes its value attached (-B/a,/b); short switches combine (-eC).
SWITCHES = {row[0]: row[1] for row in FLAGS if not row[2]}
VALUED = {row[0]: row[1] for row in FLAGS if row[2]}
ATTACHED = tuple(name for name in VALUED if len(name) == 2)

# image-mpi's view: its words (name -> takes a value); every other option word is the
# launcher's. --launcher is image-mpi's alone (not a runtime option).
IMAGE_MPI_ONLY = {"--launcher": True}
IMAGE_MPI = dict({row[0]: row[2] for row in FLAGS if row[3] != "launcher"},
                 **IMAGE_MPI_ONLY)
LAUNCHERS = frozenset(row[0] for row in FLAGS if row[3] == "launcher")

# The variables: Apptainer's NAME (after APPTAINER_ or SINGULARITY_) -> (attribute,
# takes a value, the option it stands for); those of options hpcimage lacks warn.
ENV_KEYS = {key: (row[1], row[2], row[0]) for row in FLAGS for key in row[4]}
ENV_UNSUPPORTED = {key: name for name, keys in UNSUPPORTED.items() for key in keys}
ENV_PREFIXES = ("APPTAINER_", "SINGULARITY_")
# hpcimage's own bind variable, read after Apptainer's (as -B)
HPCIMAGE_BIND = "HPCIMAGE_BIND"
# What --compat and --containall stand for (Apptainer's actionCompatFlag and
# actionContainAllFlag).
COMPAT = ("containall", "no_init", "no_umask", "no_eval", "writable_tmpfs")
CONTAINALL = ("contain", "cleanenv", "pid", "ipc")

_FLAGS = SWITCHES
_VALUED = VALUED

TRUE_WORDS = ("1", "t", "T", "true", "TRUE", "True")       # Go's strconv.ParseBool
FALSE_WORDS = ("0", "f", "F", "false", "FALSE", "False")


def unsupported(name):
    """The message for an Apptainer option hpcimage lacks."""
    long = UNSUPPORTED_SHORT.get(name, name)
    said = f"{name} ({long})" if long != name else name
    if long in NOT_YET:
        return f"{said} is an Apptainer option that hpcimage does not support yet"
    return f"{said} is an Apptainer option that hpcimage does not support"


def split_binds(val):
    """A -B value (or a *_BIND/*_BINDPATH variable's): its bind specs, comma-separated
    with Apptainer's escapes (config.bindspec, imported only when there is a value)."""
    from hpcimage.config.bindspec import split_list
    return split_list(val)


def _set(o, name, key, val, seen=None):
    """Option name (attribute key) given value val (None: a switch)."""
    if seen is not None:
        seen.setdefault(key, name)
    if val is None:
        setattr(o, key, True)
    elif key == "bind":
        o.binds.extend(split_binds(val))
    elif key == "overlays":
        if not val:
            raise UsageError(f"option {name} needs a value")
        o.overlays.append(val)
    elif key == "env":
        k, has, v = val.partition("=")
        if not has or not valid_name(k):
            raise UsageError(f"--env wants NAME=VALUE, got {val!r}")
        o.env.append((k, v))
    elif key in ("no_mount", "scratch"):
        getattr(o, key).extend(v.strip() for v in val.split(",") if v.strip())
    elif key == "mpi_mode" and val not in MPI_MODES:
        raise UsageError(f"--mpi-mode wants hybrid or bind, not {val!r}")
    else:
        if not val and key in ("home", "pwd", "workdir", "hostname", "env_file", "app"):
            raise UsageError(f"option {name} needs a value")
        setattr(o, key, val)


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
    seen = o.given          # attributes the command line set: their variables yield
    theirs = verb in ("shell", "run") and from_env
    i = 0
    while i < len(rest):
        a = rest[i]
        if a == "--":
            i += 1
            break
        if a in HELP_WORDS:
            o.args = ["--help"]
            return o
        if not a.startswith("-") or a == "-" or (
                theirs and a[1] != "-" and a[:2] not in WRAPPER_SHORTS):
            break
        name, eq, val = a.partition("=")
        if name in _FLAGS and not eq:
            _set(o, name, _FLAGS[name], None, seen)
            i += 1
            continue
        if name in _VALUED:
            if not eq:
                if i + 1 >= len(rest):
                    raise UsageError(f"option {name} needs a value")
                val = rest[i + 1]
                i += 1
            _set(o, name, _VALUED[name], val, seen)
            i += 1
            continue
        if a[1] != "-" and (a[:2] in _FLAGS or a[:2] in _VALUED):
            i = _short_group(o, a, rest, i, seen, theirs)
            if i is not None:
                continue
            break
        if theirs:
            break       # image-shell -c '...', image-run --flag: the rest is theirs
        if name in UNSUPPORTED or name in UNSUPPORTED_SHORT:
            raise UsageError(unsupported(name))
        name = a.split("=", 1)[0] if a.startswith("--") else a     # as click says it
        raise UsageError(f"no such option: {name} (see '{prog} --help')")
    rest = rest[i:]
    from_environ(o, environ, seen)
    settle(o)
    if o.instance is not None or (rest and rest[0].startswith("instance://") and from_env):
        if o.prog == "image-mpi":
            raise UsageError("--instance: image-mpi starts its own containers, it does not "
                             "join an instance")
        if o.instance is None:
            o.image, rest = rest[0], rest[1:]
        else:
            o.image = "instance://" + o.instance
    elif from_env:
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
                         f"{'' if from_env or o.instance else 'IMAGE '}COMMAND [ARGS...])")
    o.args = rest
    return o


def _short_group(o, a, rest, i, seen, theirs):
    """-eC, -ec, -eB/x, -B/x: short options in one word (a valued one takes the rest of
    the word, else the next word). Returns the next index; None where the word is not
    ours (image-run/image-shell: the runscript's or the shell's)."""
    letters = a[1:]
    # all of it ours, or none (image-shell -cl: the shell's)
    for c in letters:
        n = "-" + c
        if theirs and n not in WRAPPER_SHORTS:
            return None
        if n in _VALUED:
            break
        if n not in _FLAGS:
            if n in UNSUPPORTED_SHORT:
                raise UsageError(unsupported(n))
            raise UsageError(f"no such option: {n} in {a} (see '{o.prog} --help')")
    for j, c in enumerate(letters):
        n = "-" + c
        if n in _FLAGS:
            _set(o, n, _FLAGS[n], None, seen)
            continue
        val = letters[j + 1:]
        if not val:
            if i + 1 >= len(rest):
                raise UsageError(f"option {n} needs a value")
            val = rest[i + 1]
            i += 1
        _set(o, n, _VALUED[n], val, seen)
        break
    return i + 1


def from_environ(o, environ, seen=()):
    """The APPTAINER_*/SINGULARITY_* variables of Apptainer's options (ENV_KEYS): each
    sets what the command line left unset, the first of an option's names in
    Apptainer's order winning (PWD before TARGET_PWD); the *_BIND ones add to -B, as
    Apptainer's. APPTAINER_X wins over SINGULARITY_X (a warning where they differ). A
    variable of an option hpcimage lacks warns once. One pass over the names, nothing
    more when none is set."""
    found = {}
    for k in environ:
        if k[:10] == "APPTAINER_" or k[:12] == "SINGULARITY_":
            found[k] = environ[k]
    bind = environ.get(HPCIMAGE_BIND)
    if not found and not bind:
        return
    seen = set(seen)
    env_binds = []
    for key, (attr, valued, name) in ENV_KEYS.items():
        k, val = _variable(o, found, key)
        if k is None:
            continue
        if attr == "bind":
            env_binds += split_binds(val)
            continue
        if attr in seen:
            continue
        seen.add(attr)
        if attr == "overlays":      # a comma-separated list, as Apptainer's StringSlice
            o.overlays.extend(v.strip() for v in val.split(",") if v.strip())
            continue
        if not valued:
            word = val.strip()
            if word in FALSE_WORDS:
                continue
            if word not in TRUE_WORDS:
                raise UsageError(f"{k}={val}: want true or false (as {name})")
            val = None
        _set(o, name, attr, val)
    for key, name in ENV_UNSUPPORTED.items():
        k, val = _variable(o, found, key)
        if k is not None:
            o.warnings.append(f"{k} is set: {name} is an Apptainer option that hpcimage "
                              "does not support (ignored)")
    if bind:
        env_binds += split_binds(bind)
    if env_binds:
        o.binds[:0] = env_binds


def _variable(o, found, key):
    """(APPTAINER_KEY or SINGULARITY_KEY, its value), or (None, None) when neither is
    set to something (an empty value is unset); a warning where both are, differently."""
    a, s = found.get("APPTAINER_" + key, ""), found.get("SINGULARITY_" + key, "")
    if a.strip():
        if s.strip() and s != a:
            o.warnings.append(f"SINGULARITY_{key} and APPTAINER_{key} have different "
                              f"values, using APPTAINER_{key}")
        return "APPTAINER_" + key, a
    if s.strip():
        return "SINGULARITY_" + key, s
    return None, None


def settle(o):
    """What --compat and --containall stand for."""
    if o.compat:
        for k in COMPAT:
            setattr(o, k, True)
    if o.containall:
        for k in CONTAINALL:
            setattr(o, k, True)
    if o.hostname:
        o.uts = True


def help_rows(names=None, shorts=True):
    """(words, text) for each documented option, from FLAGS: ('-B, --bind SRC...',
    text). names: only these long names; shorts: name the short forms."""
    rows = []
    for name, attr, valued, where, env, doc in FLAGS:
        if doc is None or (names is not None and name not in names):
            continue
        meta, text = doc
        short = [r[0] for r in FLAGS if r[1] == attr and len(r[0]) == 2] if shorts else []
        twins = [r[0] for r in FLAGS if r[1] == attr and len(r[0]) > 2 and r[0] != name]
        words = ", ".join(short + [name] + twins)
        if shorts and not short:
            words = "    " + words
        rows.append((words + (" " + meta if meta else ""), text))
    return rows


def format_rows(rows, width=32):
    out = []
    for words, text in rows:
        if len(words) + 2 >= width:
            out.append(f"  {words}\n" + " " * width + text)
        else:
            out.append(f"  {words.ljust(width - 2)}{text}")
    return "\n".join(out) + "\n"


HELP_HEAD = """\
usage: {prog} [OPTIONS] {image}{what}

options (as Apptainer's where they mean the same; docs/apptainer.md):
"""


def usage(o):
    what = {"exec": "COMMAND [ARGS...]", "run": "[ARGS...]", "shell": "[SHELL ARGS...]",
            "test": "[ARGS...]"}
    image = "" if o.prog.startswith("image-") else "IMAGE "
    return (HELP_HEAD.format(prog=o.prog, image=image, what=what[o.verb])
            + format_rows(help_rows() + [("-h, --help", "this help")]))
