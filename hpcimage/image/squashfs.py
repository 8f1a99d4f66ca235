"""Mount a SquashFS image (a .sqfs file, or the partition inside a SIF) with squashfuse.

The FUSE daemon runs in the foreground as a child of the launcher, inside the
launcher's user and mount namespaces, with PR_SET_PDEATHSIG=SIGKILL: when the
launcher process (which has become the container's command by then) exits or is
killed, the kernel kills the daemon and the mount namespace, with the mount in it,
disappears. Nothing is mounted on the host, so nothing can be left there.
Standard library only: hot path.
"""
import os

from hpcimage.errors import HpcimageError
from hpcimage.linux import spawn, syscalls

# Multithreaded squashfuse_ll first: single-threaded squashfuse makes metadata-heavy
# jobs several times slower.
FUSE_PROGRAMS = ("squashfuse_ll", "squashfuse")


def candidates(path_env=None):
    """The FUSE programs found, in the order of preference (PATH, then /usr/bin and
    /usr/local/bin); `hpcimage doctor` lists them."""
    dirs = (path_env or os.environ.get("PATH") or "/usr/bin:/bin").split(":")
    for prog in FUSE_PROGRAMS:
        for d in dirs + ["/usr/bin", "/usr/local/bin"]:
            p = os.path.join(d or ".", prog)
            if os.access(p, os.X_OK):
                yield p


def find_program(path_env=None):
    override = os.environ.get("HPCIMAGE_SQUASHFUSE")
    if override:
        return override
    for p in candidates(path_env):
        return p
    raise HpcimageError("squashfuse not found: install squashfuse (squashfuse_ll) "
                        "to run SquashFS and SIF images")


def mount(image, mountpoint, log_path):
    """Mount image at mountpoint and start squashfuse to serve it; return its pid.

    The launcher mounts /dev/fuse itself (it holds CAP_SYS_ADMIN in its user
    namespace; an exec'd non-root squashfuse would not) and hands the connection to
    squashfuse as /dev/fd/N (libfuse >= 3.3). No polling: the first stat of the
    mount point waits for the daemon's INIT reply, or fails (ENOTCONN) if it died.
    """
    prog = find_program()
    argv = [prog, "-f"]
    if image.offset:
        argv += ["-o", f"offset={image.offset}"]
    fd = os.open("/dev/fuse", os.O_RDWR)
    try:
        syscalls.mount("squashfuse", mountpoint, "fuse.squashfuse",
                       syscalls.MS_RDONLY | syscalls.MS_NOSUID | syscalls.MS_NODEV,
                       f"fd={fd},rootmode=40000,user_id={os.getuid()},group_id={os.getgid()}")
    except OSError:
        os.close(fd)
        raise
    keep = [fd]
    path = spawn.hand_over(image.path, keep)
    argv += [path, f"/dev/fd/{fd}"]
    try:
        pid = spawn.spawn_daemon(prog, argv, log_path, keep)
    except OSError:
        os.close(fd)
        raise
    os.close(fd)    # the daemon holds the only copy: if it dies, the mount fails fast
    try:
        os.stat(mountpoint)
    except OSError:
        try:
            _, status = os.waitpid(pid, 0)
        except ChildProcessError:
            status = 0
        raise HpcimageError(_failure(image, prog, log_path, status)) from None
    return pid


def _failure(image, prog, log_path, status):
    why = spawn.why_it_failed(log_path, status)
    if "fuse" in why.lower() and ("permission" in why.lower() or "/dev/fuse" in why):
        why += " (is /dev/fuse usable by users? it must be mode 0666)"
    return f"{image.path}: cannot mount image with {os.path.basename(prog)}: {why}"
