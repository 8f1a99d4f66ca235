"""The helper daemons of a launch (FUSE servers: squashfuse, fuse2fs): children that die
with the launcher (PR_SET_PDEATHSIG), in a session of their own with the signals a job
receives ignored (procstate.helper_signals: a Ctrl-C or Slurm's step signal is for the
application), stdin and stdout on /dev/null, stderr into a log file, and no descriptor
but those handed over. Standard library only: the hot path."""
import os
import _signal as signal  # the C module: the same names, without enum (~4 ms)

from hpcimage.linux import procstate, syscalls


def hand_over(path, keep):
    """path, or /dev/fd/N when it is the launcher's pinned open file /proc/PID/fd/N
    (N is added to keep: the daemon inherits it)."""
    own = f"/proc/{os.getpid()}/fd/"
    if path.startswith(own):
        keep.append(int(path[len(own):]))
        return f"/dev/fd/{keep[-1]}"
    return path


def spawn_daemon(prog, argv, log_path, keep=(), ambient_caps=(), own_mounts=False,
                 deathsig=signal.SIGKILL):
    """Fork and exec prog with argv as a helper daemon (see the module); its stderr
    goes to log_path (created 0600, truncated). keep: descriptors it inherits at their
    numbers; ambient_caps: capabilities of the current user namespace it keeps across
    exec (syscalls.CAP_*: a libfuse 2 daemon that mounts by itself); own_mounts: a mount namespace of its own (a copy of the launcher's), so
    that the launcher's pivot_root does not move its root (a daemon that reaches its
    layers by path, fuse-overlayfs, would reach them through its own mount). deathsig:
    the signal it gets when the launcher (then the command it became) exits; a daemon
    that must flush what it holds (fuse2fs: libext2fs's cache, the superblock's clean
    flag) gets SIGHUP, left at its default so that libfuse's handler ends its loop and
    unmounts cleanly (no job sends SIGHUP to a daemon in a session of its own). Returns
    its pid;
    a failed exec exits 127 (the caller reads the log and the status)."""
    parent = os.getpid()
    log_fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    pid = os.fork()
    if pid == 0:
        try:
            syscalls.prctl(syscalls.PR_SET_PDEATHSIG, deathsig)
            if os.getppid() != parent:          # the launcher died before the prctl
                os._exit(1)
            if own_mounts:
                syscalls.unshare(syscalls.CLONE_NEWNS)
            for cap in ambient_caps:
                syscalls.ambient_cap(cap)
            null = os.open(os.devnull, os.O_RDWR)
            os.dup2(null, 0)
            os.dup2(null, 1)
            os.dup2(log_fd, 2)
            low = 3
            for k in sorted(keep):
                os.set_inheritable(k, True)
                os.closerange(low, k)
                low = k + 1
            os.closerange(low, 1024)
            os.chdir("/")
            os.setsid()
            procstate.helper_signals()
            if deathsig != signal.SIGKILL:
                signal.signal(deathsig, signal.SIG_DFL)
            os.execv(prog, argv)
        except BaseException:
            pass
        os._exit(127)
    os.close(log_fd)
    return pid


def wait_mounted(pid, at, before, timeout):
    """Wait for daemon pid, one that mounts by itself (libfuse 2's fuse2fs, gocryptfs),
    to serve its mount on `at`: until the st_dev of `at` differs from `before` (its
    st_dev before the start). Returns None once mounted, or the daemon's wait status
    when it exited first. After timeout seconds it is killed and TimeoutError raised."""
    import time
    delay = 0.001
    deadline = time.monotonic() + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return status
        try:
            if os.stat(at).st_dev != before:
                return None
        except OSError:
            pass
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            raise TimeoutError(at)
        time.sleep(delay)
        delay = min(delay * 2, 0.02)


def why_it_failed(log_path, status):
    """What a daemon that did not serve its mount said: the last line of its log, else
    its exit status (status: a wait status)."""
    try:
        with open(log_path, errors="replace") as f:
            lines = [ln.strip() for ln in f if ln.strip()]
    except OSError:
        lines = []
    return lines[-1] if lines else f"exit status {os.waitstatus_to_exitcode(status)}"


LOCK_HOLDER = "hpcimage-lock"


def hold(fds):
    """Fork a child that keeps descriptors fds open (the flock(2) locks of writable
    overlays) until the launcher, then the command it became, exits: it dies with it
    (PR_SET_PDEATHSIG), in a session of its own, the job's signals ignored, named
    LOCK_HOLDER, no other descriptor. No exec (a fork costs less). Returns its pid."""
    parent = os.getpid()
    pid = os.fork()
    if pid == 0:
        try:
            syscalls.prctl(syscalls.PR_SET_PDEATHSIG, signal.SIGKILL)
            if os.getppid() != parent:
                os._exit(1)
            syscalls.set_name(LOCK_HOLDER)
            low = 0
            for k in sorted(fds):
                os.closerange(low, k)
                low = k + 1
            os.closerange(low, 1024)
            os.chdir("/")
            os.setsid()
            procstate.helper_signals()
            while True:
                signal.pause()
        except BaseException:
            pass
        os._exit(1)
    return pid
