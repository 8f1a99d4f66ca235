"""`hpcimage instance start|run [OPTIONS] IMAGE NAME [ARGS...]` (and `image-instance
start|run NAME`): the image's startscript (or runscript) as a service in the background.

Three processes, the first two in the host's namespaces:

    the caller     parses, plans, takes NAME.lock, forks the supervisor, waits for
                   "ready" (or the error) and exits
    supervisor     own session, stdout/stderr to NAME.out/NAME.err; holds NAME.lock for
                   its whole life; forks the container, writes NAME.json once the
                   instance is up, waits for the container (and, in a Slurm job, for
                   the job step's slurmstepd) and removes the state when it ends;
                   SIGTERM/SIGINT/SIGHUP are passed to the instance's PID 1
    container      dies with the supervisor (PR_SET_PDEATHSIG); carries out the plan (user
                   and mount namespaces, the image, the binds, pivot_root) and then
                   the PID namespace (runtime/pidns.py, enter(stay=True)): our PID 1,
                   the startscript below it in a process group of its own

SIGKILL of the supervisor: the container dies (PDEATHSIG), then PID 1 (PDEATHSIG), then
every process of the PID namespace (the kernel), the squashfuse daemon (PDEATHSIG of
the container), and the mounts with the last process of their namespace.
"""
import os
import sys
import time

from hpcimage.errors import HpcimageError, UsageError
from hpcimage.linux import procstate
from hpcimage.linux import syscalls as sc
from hpcimage.runtime.instance import state as st
from hpcimage.runtime.ops import Exec, Process

# Apptainer's /.singularity.d/actions/start, with the arguments passed on (an image
# without a startscript: the instance is its PID 1 alone, as Apptainer's).
START_SH = ('s=${HPCIMAGE_STARTSCRIPT:-/.singularity.d/startscript}; unset HPCIMAGE_STARTSCRIPT; '
            'if [ -x "$s" ]; then exec "$s" "$@"; elif [ -f "$s" ]; then exec /bin/sh "$s" "$@"; fi')
STOP_GRACE = 2.0        # seconds between SIGTERM and SIGKILL when the job step ends
USAGE = "usage: hpcimage instance {verb} [OPTIONS] IMAGE NAME [ARGS...]"


class InstanceProcess(Process):
    """--pid for an instance: our PID 1 stays after the startscript (pidns, stay=True);
    ready: the pipe the launcher and PID 1 report on (set by the supervisor)."""
    __slots__ = ("ready",)

    def __init__(self, umask=None):
        super().__init__(umask, True, True)
        self.ready = None

    def describe(self):
        return [("process " + (f"umask {self.umask:04o}; " if self.umask is not None else "")
                 + "pidns instance  # fresh /proc; PID 1: hpcimage's init, stays after "
                 "the startscript; the startscript in a process group of its own")]

    def run(self, state):
        from hpcimage.runtime import pidns
        if self.umask is not None:
            os.umask(self.umask)
        pidns.enter(True, ready=self.ready, stay=True)


def parse(verb, args, environ, wrapper=False):
    """(options, name, the instance's ARGS). wrapper: image-instance (the image is the
    loaded module's)."""
    from hpcimage.runtime import options
    for a in args:
        if not a.startswith("-"):
            break
        if a.split("=", 1)[0] == "--pid-file":
            raise UsageError("--pid-file is an Apptainer option that hpcimage does not "
                             "support (the state file names the PIDs: instance list --json)")
    if args and args[0] in options.HELP_WORDS:
        raise UsageError(USAGE.format(verb=verb))
    o = options.parse(["image-exec" if wrapper else "run", *args], environ)
    o.prog = "image-instance" if wrapper else f"hpcimage instance {verb}"
    if o.args == ["--help"]:
        raise UsageError(USAGE.format(verb=verb))
    if not o.args:
        raise UsageError("no instance name given (" + USAGE.format(verb=verb) + ")")
    if o.no_init:
        raise UsageError("--no-init: an instance always has hpcimage's init as PID 1")
    name = st.check_name(o.args[0])
    return o, name, o.args[1:]


def build(verb, o, name, rest, environ):
    """The instance's plan: the options' plan, --pid made InstanceProcess, the
    startscript (start) or runscript (run) with rest, the instance's variables."""
    from hpcimage.runtime import plan as launch, request
    o.pid = True
    if verb == "start":
        o.verb, o.args = "exec", ["/bin/sh", "-c", START_SH, "startscript", *rest]
    else:
        o.verb, o.args = "run", list(rest)
    r = request.resolve(o, environ)
    p = launch.plan(r)
    for i, op in enumerate(p.ops):
        if type(op) is Process:
            p.ops[i] = InstanceProcess(op.umask)
        elif type(op) is Exec:
            set_instance_env(op, name)
            if verb == "start" and o.app:
                op.env["HPCIMAGE_STARTSCRIPT"] = f"/scif/apps/{o.app}/scif/startscript"
    return r, p


def set_instance_env(op, name):
    for k in ("APPTAINER_INSTANCE", "HPCIMAGE_INSTANCE"):
        op.env[k] = name


def slurm_anchor(environ):
    """In a Slurm job: (pid, start time) of the slurmstepd this command runs under (the
    instance ends with its job step, as under Slurm's cgroup process tracking), else
    None."""
    if not environ.get("SLURM_JOB_ID"):
        return None
    pid = os.getppid()
    for _ in range(64):
        if pid <= 1:
            return None
        try:
            with open(f"/proc/{pid}/comm") as f:
                comm = f.read().strip()
        except OSError:
            return None
        s = st.proc_stat(pid)
        if s is None:
            return None
        if comm == "slurmstepd":
            return pid, s[1]
        pid = s[0]
    return None


def start(verb, args, environ=None, wrapper=False):
    """The caller's part. Returns 0 once the instance is up; HpcimageError otherwise."""
    environ = os.environ if environ is None else environ
    if args[:1] in (["-h"], ["--help"]):
        from hpcimage.runtime import options
        prog = "image-instance" if wrapper else "hpcimage instance"
        sys.stdout.write(USAGE.format(verb=verb).replace("hpcimage instance", prog)
                         .replace("IMAGE NAME", "NAME" if wrapper else "IMAGE NAME")
                         + "\n\n" + ("the startscript (%startscript; --app: %appstart)"
                                    if verb == "start" else "the runscript")
                         + " in the background as instance NAME (docs/instances.md); "
                         "options as exec's:\n"
                         + options.format_rows(options.help_rows() + [("-h, --help", "this help")]))
        return 0
    o, name, rest = parse(verb, args, environ, wrapper)
    r, p = build(verb, o, name, rest, environ)
    if o.dry_run:
        sys.stdout.write(f"# instance {name}: supervisor, container, PID 1 (docs/instances.md)\n"
                         + p.describe())
        return 0
    base = st.base_dir(environ=environ)
    st.make_base(base)
    files = st.paths(base, name)
    lock_fd = st.lock(files["lock"])
    if lock_fd is None:
        raise HpcimageError(f"instance {name!r} already exists (or is being started): "
                            "'hpcimage instance list' shows it")
    old = st.read(files["json"])
    if old is not None or os.path.lexists(files["json"]):
        st.remove(files["json"])        # we hold the lock: its supervisor is gone
    sys.stdout.flush()
    sys.stderr.flush()
    p.warn(o.prog, environ)
    anchor = slurm_anchor(environ)
    info = {"version": st.VERSION, "name": name, "image": os.path.abspath(r.image.path),
            "verb": verb, "args": list(rest), "uid": os.getuid(), "host": st.host(),
            "boot_id": st.boot_id(), "stdout": files["out"], "stderr": files["err"],
            "job": environ.get("SLURM_JOB_ID") or None, "app": o.app}
    rd, wr = os.pipe()
    sup = os.fork()
    if sup == 0:
        code = 1
        try:
            os.close(rd)
            code = supervise(p, info, files, lock_fd, wr, anchor)
        except BaseException:           # noqa: BLE001  (a daemon: nothing to print to)
            pass
        os._exit(code)
    os.close(wr)
    os.close(lock_fd)
    msg = sc.read_to_end(rd)
    if msg.startswith(b"R"):
        return 0
    text = msg[1:].decode(errors="replace").strip() if msg.startswith(b"E") else ""
    raise HpcimageError(f"instance {name!r} did not start: "
                        + (text or f"see {files['err']}"))


def supervise(p, info, files, lock_fd, report, anchor):
    """The supervisor (a child of the caller): returns its exit status."""
    os.setsid()
    procstate.CALLER_IGNORED = frozenset()      # a service: every signal at default
    procstate.helper_signals()                  # until the instance is up
    null = os.open(os.devnull, os.O_RDWR)
    os.dup2(null, 0)
    for fd, key in ((1, "out"), (2, "err")):
        f = os.open(files[key], os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        os.dup2(f, fd)
        os.close(f)
    os.close(null)
    afd = None
    if anchor is not None:
        try:
            afd = os.pidfd_open(anchor[0])
            if st.start_time(anchor[0]) != anchor[1]:
                os.close(afd)
                afd = -1
        except OSError:
            afd = -1
    rd, wr = os.pipe()
    proc = next(op for op in p.ops if type(op) is InstanceProcess)
    proc.ready = wr
    from hpcimage.runtime.execute import execute
    c = os.fork()
    if c == 0:
        try:
            os.close(rd)
            os.close(report)
            os.close(lock_fd)
            if afd is not None and afd >= 0:
                os.close(afd)
            sc.prctl(sc.PR_SET_PDEATHSIG, 9)
            if os.getppid() == 1:
                os._exit(1)
            execute(p)
        except HpcimageError as e:
            _say(wr, "E" + e.message)
            os.write(2, f"hpcimage: error: {e.message}\n".encode())
            os._exit(1)
        except BaseException as e:     # noqa: BLE001
            _say(wr, f"E{e}")
            os._exit(1)
        os._exit(1)
    os.close(wr)
    msg = sc.read_to_end(rd)
    init, ready, err = None, False, None
    for line in msg.decode(errors="replace").splitlines():
        if line.startswith("P"):
            init = int(line[1:])
        elif line == "R":
            ready = True
        elif line.startswith("E"):
            err = line[1:]
    if err is not None or not ready or init is None:
        if init is not None:
            try:
                os.kill(init, 9)
            except OSError:
                pass
        os.waitpid(c, 0)
        _say(report, "E" + (err or "the container exited before it was up; see "
                            + files["err"]))
        _unlock(files, lock_fd)
        return 1
    now = time.time()
    info.update(supervisor=os.getpid(), supervisor_start=st.start_time(os.getpid()),
                init=init, init_start=st.start_time(init), started=now,
                started_text=time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(now)))
    try:
        st.write(files["json"], info)
    except OSError as e:
        os.kill(init, 9)
        os.waitpid(c, 0)
        _say(report, f"Ecannot write {files['json']}: {e.strerror}")
        _unlock(files, lock_fd)
        return 1
    import _signal as signal

    def forward(signum, frame):
        try:
            os.kill(init, signum)
        except OSError:
            pass
    for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(s, forward)
    _say(report, "R")
    os.close(report)
    _watch(c, init, afd)
    mine = st.read(files["json"])
    if mine is not None and mine.get("supervisor") == os.getpid():
        try:
            os.unlink(files["json"])
        except OSError:
            pass
    _unlock(files, lock_fd)
    return 0


def _watch(c, init, afd):
    """Until the container exits; the anchor (a job step's slurmstepd) gone: stop the
    instance (SIGTERM, SIGKILL after STOP_GRACE)."""
    import select
    cfd = os.pidfd_open(c)
    fds = [cfd]
    if afd is not None:
        if afd < 0:
            _stop(init, cfd)
        else:
            fds.append(afd)
    while True:
        ready = select.select(fds, [], [])[0]
        if cfd in ready:
            break
        if afd in ready:
            fds.remove(afd)
            _stop(init, cfd)
    os.waitpid(c, 0)


def _stop(init, cfd):
    import select
    try:
        os.kill(init, 15)
    except OSError:
        return
    if not select.select([cfd], [], [], STOP_GRACE)[0]:
        try:
            os.kill(init, 9)
        except OSError:
            pass


def _unlock(files, lock_fd):
    try:
        os.unlink(files["lock"])
    except OSError:
        pass
    os.close(lock_fd)


def _say(fd, text):
    try:
        os.write(fd, (text.replace("\n", " ") + "\n").encode())
    except OSError:
        pass
