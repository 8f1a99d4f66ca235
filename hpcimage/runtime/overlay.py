"""Mounting overlays (runtime.ops.OverlayLayer, OverlayMount), in the launch's user
and mount namespaces: every mount and helper dies with the container.

- A layer is locked first (flock on the directory or the ext3 image: exclusive when
  writable, shared when read-only), so a second writer is refused with one line; the
  locks go to a small holder process (linux.spawn.hold) that dies with the command.
- The union is the kernel's overlayfs with `userxattr` where the kernel can serve it
  from a user namespace (image.overlay.kernel_can: Linux >= 5.11, the writable layer
  not on FUSE, not on tmpfs before 6.6; a mount that comes out read-only is not
  taken), else fuse-overlayfs (an ext3 layer, served by fuse2fs, always: the kernel
  mounts an overlay whose upper is on fuse2fs read-only). HPCIMAGE_OVERLAY_DRIVER or
  site.yaml overlay_driver forces one.
- The bind targets the image lacks are made in a layer of their own (the points
  layer, on the session tmpfs), never in the user's layer; it is the lowest layer, so
  that a directory of the image keeps the image's owner and mode (the union takes a
  directory's attributes from the topmost layer that has it).

Standard library only: the hot path (imported only when an overlay is asked for).
"""
import errno
import fcntl
import os

from hpcimage.errors import HpcimageError
from hpcimage.image import overlay as ovl
from hpcimage.linux import spawn
from hpcimage.linux import syscalls as sc
from hpcimage.linux.paths import resolve_in

FUSE_OVERLAYFS = "fuse-overlayfs"
ST_RDONLY = 1


def _flock_soon(fd, mode, wait=3.0):
    """flock(fd, mode) without blocking, tried again for up to wait seconds: the
    container before this one may have exited a moment ago while its ext3 daemon, which
    holds the lock until it has flushed (data.mount's hold), still writes. Raises
    BlockingIOError when the lock stays taken (another container runs)."""
    try:
        fcntl.flock(fd, mode | fcntl.LOCK_NB)
        return
    except BlockingIOError:
        pass
    import time
    deadline = time.monotonic() + wait
    while True:
        time.sleep(0.02)
        try:
            fcntl.flock(fd, mode | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if time.monotonic() > deadline:
                raise


def _busy(layer, fd):
    """The line for a layer locked by another container (fd: the layer, unlocked;
    closed here). A reader met a writer: wait. A writer: if a shared lock would be
    granted the others only read (add :ro, or leave out --writable for a SIF's own
    partition), else another writes (wait)."""
    try:
        readers = False
        if layer.writable:
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
                readers = True
            except OSError:
                pass
    finally:
        os.close(fd)
    own = bool(layer.offset) and layer.spec == layer.path      # a SIF's own partition
    what = ("the overlay partition of " if own else "overlay ") + layer.path + \
        " is in use by another container"
    if not readers:
        return what + " that writes it (a writable overlay serves one container at a " \
                      "time): wait until it exits"
    ro = "leave out --writable" if own else "add :ro"
    return what + f" that reads it (a writable overlay serves one container at a time): " \
                  f"{ro} to read it too, or wait until it exits"


def _lock(layer, path):
    """flock the layer's directory or file (exclusive when writable, shared when
    read-only); the fd, or None for a layer that needs none."""
    if layer.kind not in ("dir", "ext3"):
        return None
    flags = os.O_RDONLY | os.O_CLOEXEC | (os.O_DIRECTORY if layer.kind == "dir" else 0)
    try:
        fd = os.open(path, flags)
    except OSError as e:
        raise HpcimageError(f"overlay {layer.spec}: cannot open {layer.path}: "
                            f"{e.strerror}", 2) from None
    try:
        _flock_soon(fd, fcntl.LOCK_EX if layer.writable else fcntl.LOCK_SH)
    except OSError as e:
        if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN) and getattr(layer, "personal", False):
            os.close(fd)
            raise HpcimageError(
                f"your personal overlay {layer.path} is "
                + ("in use by another container: exit it first (image-shell and --fakeroot "
                   "write it while nothing else uses it)" if layer.writable else
                   "open for writing by another container (image-shell?): exit it first"),
                1) from None
        if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
            raise HpcimageError(_busy(layer, fd), 1) from None
        os.close(fd)
        raise HpcimageError(f"overlay {layer.spec}: cannot lock {layer.path}: "
                            f"{e.strerror}", 1) from None
    return fd


def mount_layer(layer, at, path, prog, state):
    """Lock layer, mount it at at (path: where to reach it, a pinned /proc/PID/fd/N
    or layer.path), make upper/ and work/ where it is writable."""
    fd = _lock(layer, path)
    if fd is not None:
        state.lock_fds.append(fd)
    os.makedirs(at, exist_ok=True)
    kind = layer.kind
    if kind == "tmpfs":
        sc.mount("hpcimage-tmpfs", at, "tmpfs", sc.MS_NOSUID | sc.MS_NODEV,
                 f"size={layer.size_mib}m,mode=0755")
    elif kind == "dir":
        sc.mount(path, at, None, sc.MS_BIND | sc.MS_REC)
        if not layer.writable:
            from hpcimage.runtime.rootfs import remount_ro
            remount_ro(at)
    else:
        from hpcimage.image import data
        fs = data.DataFs(path, kind, layer.offset, layer.size)
        state.data_pids.append(data.mount(fs, at, at + ".log", not layer.writable,
                                          () if fd is None else (fd,)))
    if layer.writable:
        for d, mode in (("upper", 0o755), ("work", 0o700)):
            try:
                os.makedirs(f"{at}/{d}", mode, exist_ok=True)
                if not os.access(f"{at}/{d}", os.W_OK | os.X_OK):
                    raise HpcimageError(
                        f"overlay {layer.spec}: {d}/ in {layer.path} belongs to root or "
                        "another user, not you (an overlay made with --fakeroot is "
                        "written with --fakeroot): use --fakeroot, or an overlay of your "
                        "own", 1)
            except OSError as e:
                raise HpcimageError(
                    f"overlay {layer.spec}: cannot create {d}/ in {layer.path}: "
                    f"{e.strerror}" + (" (it belongs to another user: make it with "
                                       "'hpcimage overlay create', or use --fakeroot)"
                                       if e.errno in (errno.EACCES, errno.EPERM) else ""),
                    1) from None


def lower_dir(layer, at):
    """The directory a layer mounted at at gives the union: its upper/ (writable, an
    ext3 image, a directory that has one), else the mount itself (SquashFS, a
    directory without upper/), as Apptainer's."""
    if layer.kind in ("squashfs", "tmpfs"):
        return at + "/upper" if layer.kind == "tmpfs" else at
    if layer.writable or layer.kind == "ext3" or os.path.isdir(layer.path + "/upper"):
        return at + "/upper"
    return at


def _points(op):
    """Make, in op.points, the bind targets that no layer has (dirs for directory
    sources, files otherwise), resolved in the image."""
    os.makedirs(op.points, 0o755, exist_ok=True)
    layers = [op.upper] if op.upper else []
    layers += op.lowers
    for dst, src in op.targets:
        rel = resolve_in(op.image_dir, dst)
        if not rel or any(os.path.lexists(os.path.join(d, rel)) for d in layers):
            continue
        path = os.path.join(op.points, rel)
        if os.path.lexists(path):
            continue
        os.makedirs(os.path.dirname(path), 0o755, exist_ok=True)
        if os.path.isdir(src):
            os.mkdir(path, 0o755)
        else:
            os.close(os.open(path, os.O_CREAT | os.O_WRONLY | os.O_CLOEXEC, 0o644))


def driver(op):
    """"kernel" or "fuse-overlayfs" for op (an OverlayMount): what was forced, else
    what the kernel can serve (image.overlay.kernel_can)."""
    if op.driver != "auto":
        return op.driver
    fstype = sc.fstype(op.upper) if op.upper else None
    return "kernel" if ovl.kernel_can(fstype) else FUSE_OVERLAYFS


def mount_union(op, state):
    """The overlay of op (an OverlayMount), then the locks handed to a holder."""
    _points(op)
    lowers = op.lowers + [op.points]
    os.makedirs(op.at, exist_ok=True)
    how = driver(op)
    if how == "kernel":
        data = "lowerdir=" + ":".join(lowers)
        if op.upper:
            data += f",upperdir={op.upper},workdir={op.work}"
        try:
            sc.mount("overlay", op.at, "overlay", 0, data + ",userxattr")
        except OSError as e:
            if op.driver == "kernel":
                raise
            how = FUSE_OVERLAYFS    # the kernel cannot: fuse-overlayfs
        else:
            if op.upper and os.statvfs(op.at).f_flag & ST_RDONLY:
                sc.umount2(op.at, sc.MNT_DETACH)    # a read-only union: fuse-overlayfs
                how = FUSE_OVERLAYFS
    if how == FUSE_OVERLAYFS:
        if op.upper:
            _mark(op.work)
        state.data_pids.append(_fuse_overlayfs(lowers, op.upper, op.work, op.at))
    if state.lock_fds:
        fds, state.lock_fds = state.lock_fds, []
        try:
            state.data_pids.append(spawn.hold(fds))
        finally:
            for fd in fds:
                os.close(fd)


def _mark(work):
    """Leave FUSE_MARK beside the writable layer's upper/ and work/: fuse-overlayfs
    writes it (whiteouts and opaque markers the kernel's overlayfs shows as files), so
    that later launches read it with fuse-overlayfs too (runtime.steps)."""
    try:
        os.close(os.open(os.path.join(os.path.dirname(work), ovl.FUSE_MARK),
                         os.O_CREAT | os.O_WRONLY | os.O_CLOEXEC, 0o644))
    except OSError:
        pass


def find_fuse_overlayfs(path_env=None):
    dirs = (path_env or os.environ.get("PATH") or "/usr/bin:/bin").split(":")
    for d in dirs + ["/usr/bin", "/usr/local/bin"]:
        p = os.path.join(d or ".", FUSE_OVERLAYFS)
        if os.access(p, os.X_OK):
            return p
    raise HpcimageError("fuse-overlayfs not found: install fuse-overlayfs (the kernel's "
                        "overlayfs cannot serve this overlay from a user namespace)", 1)


def _fuse_overlayfs(lowers, upper, work, at):
    """fuse-overlayfs serving the union at at: the launcher mounts /dev/fuse (it holds
    CAP_SYS_ADMIN in its user namespace) and hands the connection over as /dev/fd/N
    (libfuse 3), as squashfuse's mount does. Returns its pid."""
    prog = find_fuse_overlayfs()
    if work and os.path.isdir(work + "/work"):
        os.chmod(work + "/work", 0o700)     # the kernel's overlayfs leaves it mode 000
    # noacl: with ACLs on, the kernel asks for system.posix_acl_access on exec, and a
    # SquashFS lower layer's EOPNOTSUPP fails the exec itself
    opts = "noacl,lowerdir=" + ":".join(lowers)
    if upper:
        opts += f",upperdir={upper},workdir={work}"
    fd = os.open("/dev/fuse", os.O_RDWR)
    try:
        sc.mount("fuse-overlayfs", at, "fuse.fuse-overlayfs", sc.MS_NOSUID | sc.MS_NODEV,
                 f"fd={fd},rootmode=40000,user_id={os.getuid()},group_id={os.getgid()},"
                 "default_permissions,allow_other")
    except OSError:
        os.close(fd)
        raise
    log = at + ".log"
    try:
        pid = spawn.spawn_daemon(prog, [prog, "-f", "-o", opts, f"/dev/fd/{fd}"], log, [fd],
                                 own_mounts=True)
    finally:
        os.close(fd)
    try:
        os.stat(at)
    except OSError:
        try:
            _, status = os.waitpid(pid, 0)
        except ChildProcessError:
            status = 0
        raise HpcimageError(f"cannot mount the overlay with fuse-overlayfs: "
                            f"{spawn.why_it_failed(log, status)}", 1) from None
    return pid

