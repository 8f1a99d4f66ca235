"""`hpcimage exec|run|shell instance://NAME ...` and `image-exec --instance NAME ...`:
join a running instance and run there. Standard library only (reached from image-exec).

The state is checked (runtime/instance/state.py: lock, boot id, supervisor and PID 1
with their start times); then the same request and plan as a launch, of which only
the tail runs (chdir, the command's process state, exec: the environment computed as
for any launch, the image's env scripts included), after setns(2) into the instance's
user, mount, PID, IPC and UTS namespaces (those it has apart from ours). A PID
namespace takes effect for children: the command is forked; this process waits,
forwarding signals, and exits with its status (128+N for a signal death).
"""
import os

from hpcimage.errors import UsageError
from hpcimage.linux import syscalls as sc
from hpcimage.runtime.instance import state as st

PREFIX = "instance://"

# What a join applies: the command's process (its environment, directory, umask, app);
# every other option would change the instance's mounts or namespaces, fixed by
# `instance start`, and is refused (its variables: ignored with a warning).
FOR_JOIN = ("cleanenv", "pwd", "env", "env_file", "no_eval", "no_umask", "app", "dry_run",
            "instance")
NAMESPACES = (("user", sc.CLONE_NEWUSER), ("ipc", sc.CLONE_NEWIPC), ("uts", sc.CLONE_NEWUTS),
              ("mnt", sc.CLONE_NEWNS), ("pid", sc.CLONE_NEWPID))


def start_words(o):
    """The options for `instance start` only that the command line gave (o.given: as
    the parser read them), as the user wrote them, in their order."""
    return [word for attr, word in o.given.items() if attr not in FOR_JOIN]


def start_variables(environ):
    """The APPTAINER_*/SINGULARITY_* (and HPCIMAGE_BIND) variables set for options for
    `instance start` only (a false switch's left out)."""
    from hpcimage.runtime.options import ENV_KEYS, ENV_PREFIXES, FALSE_WORDS, HPCIMAGE_BIND
    out = [HPCIMAGE_BIND] if environ.get(HPCIMAGE_BIND, "").strip() else []
    for key, (attr, valued, _name) in ENV_KEYS.items():
        if attr in FOR_JOIN:
            continue
        for prefix in ENV_PREFIXES:
            val = environ.get(prefix + key, "").strip()
            if val and (valued or val not in FALSE_WORDS):
                out.append(prefix + key)
    return out


def join(o, argv, environ):
    """Run o's command in the instance o.image (instance://NAME). Returns only on
    --dry-run (0); else exits with the command's status."""
    from hpcimage.runtime import plan as launch, request
    from hpcimage.runtime.ops import Chdir, Exec
    from hpcimage.runtime.instance.start import set_instance_env
    name = o.image[len(PREFIX):]
    st.check_name(name)
    words = start_words(o)
    if words:
        raise UsageError(f"{words[0]}: not for a running instance ({PREFIX}{name}); give "
                         "it to 'hpcimage instance start'")
    ignored = start_variables(environ)
    if ignored:         # the options again, without them: the instance has its own
        from hpcimage.runtime.options import parse
        o = parse(argv, {k: v for k, v in environ.items() if k not in ignored})
        o.warnings.append(f"{', '.join(ignored)}: not for a running instance "
                          f"({PREFIX}{name}), ignored (options of 'instance start')")
    data = st.find(name, st.base_dir(environ=environ))
    o.image = data["image"]
    r = request.resolve(o, environ)
    p = launch.plan(r)
    head, tail = launch.split(p, Chdir)
    for op in tail.ops:
        if type(op) is Exec:
            set_instance_env(op, name)
    init = int(data["init"])
    if o.dry_run:
        import sys
        tail.warnings = p.warnings
        sys.stdout.write(f"join {PREFIX}{name}  # setns into PID {init}'s user, ipc, uts, "
                         "mnt and pid namespaces\n" + tail.describe())
        return 0
    p.warn(o.prog, environ)
    fds = []
    for ns, flag in NAMESPACES:
        try:
            theirs = os.stat(f"/proc/{init}/ns/{ns}").st_ino
            if theirs == os.stat(f"/proc/self/ns/{ns}").st_ino:
                continue
            fds.append((os.open(f"/proc/{init}/ns/{ns}", os.O_RDONLY | os.O_CLOEXEC), flag))
        except OSError as e:
            from hpcimage.errors import HpcimageError
            raise HpcimageError(f"cannot join instance {name!r}: {ns} namespace: "
                                f"{e.strerror}") from None
    if st.check(data, st.paths(data["_base"], name)["lock"]) is not None:
        from hpcimage.errors import HpcimageError   # gone between find and open
        raise HpcimageError(f"instance {name!r} ended; nothing to join")
    from hpcimage.runtime.execute import execute
    from hpcimage.runtime import pidns
    try:
        for fd, flag in fds:
            if flag == sc.CLONE_NEWUSER and os.getuid() == 0:
                continue
            sc.setns(fd, flag)
            os.close(fd)
    except OSError as e:
        from hpcimage.errors import HpcimageError
        raise HpcimageError(f"cannot join instance {name!r}: {e.strerror}") from None
    os.chdir("/")
    import sys
    sys.stdout.flush()
    sys.stderr.flush()
    child = os.fork()
    if child == 0:
        from hpcimage.errors import HpcimageError
        try:
            execute(tail)
        except HpcimageError as e:
            os.write(2, f"{o.prog}: error: {e.message}\n".encode())
            os._exit(e.status)
        os._exit(1)
    pidns._wait(child, reap=False)
