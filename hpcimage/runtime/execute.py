"""execute(plan): the one loop that carries out a Plan's operations in order.
Standard library only: the hot path."""
import os

from hpcimage.errors import HpcimageError
from hpcimage.linux import syscalls as sc
from hpcimage.runtime.command import _chdir, _exec
from hpcimage.runtime.rootfs import _build_root, _files, _make_target, _map_ids, _remount_ro


def execute(p):
    """Carry out plan p. Does not return when the command was exec'd; returns the
    squashfuse daemon's pid (or None) when p holds no exec step."""
    mount_pid = None
    trace = os.environ.get("HPCIMAGE_TRACE") == "1"
    if trace:
        import time
        t = time.perf_counter()
    for op in p.ops:
        name, args = op[0], op[1:]
        if trace:
            now = time.perf_counter()
            os.write(2, f"hpcimage: trace: {(now - t) * 1000:7.2f} ms before {name}\n".encode())
            t = now
        try:
            if name == "userns":
                uid, gid = args
                if uid == 0:
                    sc.unshare(sc.CLONE_NEWNS)
                else:
                    sc.unshare(sc.CLONE_NEWUSER | sc.CLONE_NEWNS)
                    _map_ids(uid, gid)
            elif name == "private":
                sc.mount(None, "/", None, sc.MS_REC | sc.MS_PRIVATE)
            elif name == "session":
                base = args[0]
                _pin_sources(p.ops, base)
                sc.mount("hpcimage", base, "tmpfs", sc.MS_NOSUID | sc.MS_NODEV, "mode=0755")
                for d in ("image", "home", "tmp", "vartmp", "dev"):
                    os.mkdir(f"{base}/{d}", 0o700)
                for d in ("tmp", "vartmp"):
                    os.chmod(f"{base}/{d}", 0o1777)
                os.chmod(f"{base}/dev", 0o755)
                os.mkdir(f"{base}/dev/shm", 0o1777)
                os.chmod(f"{base}/dev/shm", 0o1777)
                os.mkdir(f"{base}/dev/pts")
            elif name == "image":
                image, at = args
                if image.needs_mount:
                    from hpcimage.image import squashfs
                    mount_pid = squashfs.mount(image, at, at + ".log")
                else:
                    sc.mount(image.path, at, None, sc.MS_BIND | sc.MS_REC)
                    _remount_ro(at)
                image_root = at
                if image.arch in (None, "unknown"):     # a SIF's header was checked
                    from hpcimage.image import arch
                    arch.check_tree(image.path, at)
            elif name == "rootfs":
                image_dir, root, targets = args
                _build_root(image_dir, root, targets)
            elif name == "files":
                _files(*args[:1], image_root, *args[1:])
            elif name == "bind":
                b = args[0]
                target = _make_target(root, b.dst, os.path.isdir(b.src))
                sc.mount(b.src, target, None, sc.MS_BIND | sc.MS_REC)
                if b.ro:
                    _remount_ro(target)
            elif name == "readonly":
                _remount_ro(args[0])
            elif name == "pivot":
                os.chdir(args[0])
                sc.pivot_root(".", ".")
                sc.umount2(".", sc.MNT_DETACH)
                os.chdir("/")
            elif name == "chdir":
                _chdir(*args[:4], prog=next((o[7] for o in p.ops if o[0] == "exec"), None))
            elif name == "exec":
                _exec(*args)
        except HpcimageError:
            raise
        except OSError as e:
            if mount_pid:
                _kill(mount_pid)
            raise HpcimageError(_oserror(name, e)) from None
    return mount_pid


SESSION_NAMES = ("image", "home", "tmp", "vartmp", "dev", "passwd", "group", "root",
                 "image.log")


def _pin_sources(ops, base):
    """Host paths below the session directory (a fallback such as /mnt may hold the
    user's data) disappear under the session tmpfs: open them first and use them as
    /proc/PID/fd/N (still valid for mount(2) and for squashfuse started from here)."""
    prefix = base.rstrip("/") + "/"
    own = tuple(prefix + n for n in SESSION_NAMES)

    def pin(path):
        if not path.startswith(prefix) or path.startswith(own):
            return path
        flags = os.O_PATH if os.path.isdir(path) else os.O_RDONLY   # squashfuse reads it
        fd = os.open(path, flags | os.O_CLOEXEC)
        return f"/proc/{os.getpid()}/fd/{fd}"
    for op in ops:
        if op[0] == "bind":
            op[1].src = pin(op[1].src)
        elif op[0] == "image":
            op[1].path = pin(op[1].path)


def _kill(pid):
    import _signal as signal
    try:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    except OSError:
        pass


def _oserror(step, e):
    msg = f"launch step '{step}' failed: {e.strerror or e}"
    if e.filename:
        msg += f": {e.filename}"
    if step == "userns" and e.errno in (1, 22, 28):
        msg += " (are unprivileged user namespaces enabled? see user.max_user_namespaces)"
    return msg
