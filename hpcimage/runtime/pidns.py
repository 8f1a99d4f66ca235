"""--pid: the command in a new PID namespace. Imported only when asked. Standard
library only.

The launcher forks (unshare(CLONE_NEWPID) moves its children only): it stays outside,
forwards signals to the namespace's PID 1 and exits with its status (128+N for a signal
death). PID 1 mounts a fresh /proc (only the container's processes show), then, as
Apptainer's shim init, forks the command and forwards signals to it, reaps orphans and
exits with the command's status; with --no-init it returns and the command is PID 1
(signals it does not handle are then ignored, as for any PID 1). PID 1 dies with the
launcher (PR_SET_PDEATHSIG), and the namespace's processes with PID 1.
"""
import os
import _signal as signal

from hpcimage.linux import syscalls as sc

# Forwarded to the child: what a caller or a batch system sends (SIGKILL and SIGSTOP
# cannot be caught: SIGKILL of the launcher kills PID 1 through PR_SET_PDEATHSIG).
FORWARD = ("SIGHUP", "SIGINT", "SIGQUIT", "SIGTERM", "SIGUSR1", "SIGUSR2", "SIGALRM",
           "SIGCONT", "SIGWINCH", "SIGXCPU", "SIGPWR")


def enter(init=True, ready=None, stay=False):
    """Returns in the process that goes on to exec the command; the others exit."""
    sc.unshare(sc.CLONE_NEWPID)
    alive, held = os.pipe()             # EOF on `alive`: the launcher is gone
    pid = os.fork()
    if pid:
        os.close(alive)
        if ready is not None:
            os.write(ready, f"P{pid}\n".encode())
            os.close(ready)
        _wait(pid, reap=False)
    os.close(held)
    sc.prctl(sc.PR_SET_PDEATHSIG, signal.SIGKILL)
    os.set_blocking(alive, False)
    try:
        gone = os.read(alive, 1) == b""     # died before the prctl (getppid() is 0
    except BlockingIOError:                 # here: the parent is outside)
        gone = False
    os.close(alive)
    if gone:
        os._exit(128 + signal.SIGKILL)
    try:
        sc.mount("proc", "/proc", "proc", sc.MS_NOSUID | sc.MS_NODEV | sc.MS_NOEXEC)
    except OSError as e:
        os.write(2, f"hpcimage: error: launch step 'process' failed: mounting /proc of "
                    f"the PID namespace: {os.strerror(e.errno)}\n".encode())
        os._exit(1)
    if not init:
        return
    pid = os.fork()
    if pid == 0:
        if stay:        # `ready` stays open until the exec (close-on-exec): the
            os.setpgid(0, 0)    # launcher's reader sees EOF once the command runs
        return
    if stay:
        _stay(pid, ready)
    _wait(pid, reap=True)


def _noop(signum, frame):
    pass


def _stay(child, ready):
    """An instance's PID 1: forward to child's process group, reap everything, stay
    after the group is gone until a stop signal; exit 0 then. The signals are blocked
    and taken with sigwaitinfo: no reaping is lost between a check and a wait."""
    try:
        os.setpgid(child, child)
    except OSError:
        pass
    fwd = {getattr(signal, n) for n in FORWARD if hasattr(signal, n)}
    stops = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
    for s in fwd | {signal.SIGCHLD}:    # a handler: a PID 1 gets only handled signals
        signal.signal(s, _noop)
    signal.pthread_sigmask(signal.SIG_BLOCK, fwd | {signal.SIGCHLD})
    os.write(ready, b"R\n")
    os.close(ready)
    stopping = False
    while True:
        try:
            while os.waitpid(-1, os.WNOHANG)[0]:
                pass
        except ChildProcessError:
            pass
        if stopping:
            try:
                os.killpg(child, 0)
            except ProcessLookupError:
                os._exit(0)
            except OSError:
                pass
        signum = signal.sigwaitinfo(fwd | {signal.SIGCHLD}).si_signo
        if signum == signal.SIGCHLD:
            continue
        try:
            os.killpg(child, signum)
        except OSError:
            pass
        stopping = stopping or signum in stops


def _wait(child, reap):
    """Forward signals to child until it exits, then exit with its status; reap: also
    collect every other child (PID 1's orphans)."""
    def forward(signum, frame):
        try:
            os.kill(child, signum)
        except OSError:
            pass
    for name in FORWARD:
        s = getattr(signal, name, None)
        if s is not None:
            signal.signal(s, forward)
    while True:
        try:
            pid, status = os.waitpid(-1 if reap else child, 0)
        except ChildProcessError:
            os._exit(1)
        if pid == child:
            code = os.waitstatus_to_exitcode(status)
            os._exit(code if code >= 0 else 128 - code)
