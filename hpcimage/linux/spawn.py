"""Starting a program without subprocess (whose import costs the build ~10 ms):

    run(argv) -> (exit status, output bytes)    stdin /dev/null, stdout+stderr captured
    spawn(argv) -> (pid, fd); finish(pid, fd) -> (exit status, output bytes)
"""
import os


def spawn(argv, env=None):
    """Start argv (looked up on PATH as execvp does) with stdin from /dev/null and
    stdout and stderr into one pipe. (pid, read end). Raises OSError (FileNotFoundError
    when there is no such program) as subprocess.Popen does."""
    from hpcimage.linux import procstate   # signals: the caller's, not Python's
    r, w = os.pipe()                  # both close-on-exec; dup2 makes 1 and 2 inherited
    try:
        pid = os.posix_spawnp(argv[0], argv, os.environ if env is None else env,
                              file_actions=[(os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
                                            (os.POSIX_SPAWN_DUP2, w, 1),
                                            (os.POSIX_SPAWN_DUP2, w, 2)],
                              **procstate.spawn_args())
    except BaseException:
        os.close(r)
        raise
    finally:
        os.close(w)
    return pid, r


def finish(pid, fd):
    """Read fd to its end, then reap pid: (exit status as subprocess reports it,
    output)."""
    chunks = []
    try:
        while True:
            b = os.read(fd, 65536)
            if not b:
                break
            chunks.append(b)
    finally:
        os.close(fd)
    _, status = os.waitpid(pid, 0)          # EINTR is retried by Python (PEP 475)
    return os.waitstatus_to_exitcode(status), b"".join(chunks)


def run(argv, env=None):
    """subprocess.run(argv, stdin=DEVNULL, stdout=PIPE, stderr=STDOUT): (status, bytes)."""
    return finish(*spawn(argv, env))
