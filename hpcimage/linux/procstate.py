"""The process state a command starts with: what a shell on the host would give it.

Every path that execs a program (image-exec/run/shell, the env-script /bin/sh, MPI
ranks and the launcher they start, the MPI holder's probes, a build's %setup, %post
and %test) calls `for_exec()` right before execve(2), or passes `spawn_args()` to
posix_spawn:

* signal dispositions: the caller's. The interpreter ignores SIGPIPE and SIGXFSZ at
  start-up (and the caller's setting is lost then): those become default, as they are
  from any shell; a signal the caller ignored (`nohup`: SIGHUP; a background job of a
  non-interactive shell: SIGINT, SIGQUIT) stays ignored, as a shell passes it on;
  whatever hpcimage itself ignored or caught on the way is undone;
* the signal mask: empty;
* the environment: the one the interpreter was started with (`caller_environ`):
  Python's C-locale coercion (PEP 538) adds LC_CTYPE=C.UTF-8 to its own environment
  when the caller set no locale, and that must not reach the command.

umask, resource limits, process group, session and controlling terminal are the
caller's because nothing on these paths changes them; descriptors are close-on-exec
(PEP 446) unless passed on on purpose. Standard library only: this is the hot path.
"""
import os
import _signal as signal  # the C module: the same names, without enum (~4 ms)

# Ignored by the interpreter at start-up (Python/pylifecycle.c); SIGXFZ is SIGXFSZ.
INTERPRETER_IGNORED = (signal.SIGPIPE, signal.SIGXFSZ)
_UNCATCHABLE = (signal.SIGKILL, signal.SIGSTOP)
_SIGNALS = tuple(s for s in range(1, signal.NSIG) if s not in _UNCATCHABLE)


def _ignored_now():
    out = set()
    for s in _SIGNALS:
        try:
            if signal.getsignal(s) == signal.SIG_IGN:
                out.add(s)
        except (OSError, ValueError):
            pass
    return out


# What the caller ignored, as the interpreter found it (this module is imported before
# hpcimage changes any disposition; a forked child inherits the record).
CALLER_IGNORED = frozenset(_ignored_now().difference(INTERPRETER_IGNORED))


def for_exec():
    """Give the command the caller's signal state; call right before execve(2).

    A disposition that is a Python handler needs nothing: execve resets it to the
    default (unless the caller ignored that signal, then it is ignored again)."""
    for s in _SIGNALS:
        try:
            h = signal.getsignal(s)
        except (OSError, ValueError):
            continue
        if s in CALLER_IGNORED:
            if h != signal.SIG_IGN:
                signal.signal(s, signal.SIG_IGN)
        elif h == signal.SIG_IGN:
            signal.signal(s, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_SETMASK, ())


def spawn_args():
    """posix_spawn's keyword arguments that do what for_exec() does, in the child."""
    return {"setsigdef": [s for s in _ignored_now() if s not in CALLER_IGNORED],
            "setsigmask": ()}


# Signals that the helpers serving a container (the squashfuse daemon, the MPI holder)
# ignore: they are meant for the program (a group's `kill -USR1 -PGID`, Slurm's
# `scancel --signal`, `--signal=USR1@60`, SIGTERM before the end of a step). The
# helpers live in a session of their own as well; they go with the container: the
# daemon when the launcher or holder dies (PR_SET_PDEATHSIG), the holder when the
# last rank has gone (the job's refs lock). SIGKILL still ends them.
HELPER_IGNORES = (signal.SIGHUP, signal.SIGINT, signal.SIGQUIT, signal.SIGTERM,
                  signal.SIGUSR1, signal.SIGUSR2, signal.SIGALRM, signal.SIGPIPE,
                  signal.SIGVTALRM, signal.SIGPROF, signal.SIGXCPU, signal.SIGXFSZ,
                  signal.SIGTSTP, signal.SIGTTIN, signal.SIGTTOU, signal.SIGPOLL)


def helper_signals():
    """In a helper (after fork): ignore HELPER_IGNORES (kept across its execve)."""
    for s in HELPER_IGNORES:
        signal.signal(s, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_SETMASK, ())


# Variables the interpreter itself may add to its environment at start-up: PEP 538's
# C-locale coercion sets LC_CTYPE (C.UTF-8, C.utf8 or UTF-8) when no locale is set.
INTERPRETER_VARS = ("LC_CTYPE",)


def caller_environ(environ=None):
    """Undo in environ (default os.environ) what the interpreter added or changed at
    start-up, from the environment the process was started with (/proc/self/environ:
    the kernel's copy, which setenv(3) does not touch). Returns environ."""
    environ = os.environ if environ is None else environ
    if not any(k in environ for k in INTERPRETER_VARS):
        return environ
    try:
        with open("/proc/self/environ", "rb") as f:
            raw = f.read()
    except OSError:
        return environ
    start = {}
    for item in raw.split(b"\0"):
        k, eq, v = item.partition(b"=")
        if eq and k.decode("latin-1") in INTERPRETER_VARS:
            start[os.fsdecode(k)] = os.fsdecode(v)
    for k in INTERPRETER_VARS:
        if k not in start:
            environ.pop(k, None)
        elif environ.get(k) != start[k]:
            environ[k] = start[k]
    return environ
