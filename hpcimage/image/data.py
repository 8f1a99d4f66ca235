"""Image files bound as data (`-B FILE:DST:image-src=PATH`, `id=N`), as Apptainer's
image binds: a SquashFS file, an ext2/3/4 file system image, or a SIF's data
partition (the first, or the partition with object id N). `locate` finds the file
system inside the file without mounting it; `mount` mounts it: SquashFS with
squashfuse (image.squashfs), ext3 with fuse2fs. Standard library only (the runtime
imports it, on the hot path, only when an image bind is asked for).
"""
import os

from hpcimage.errors import HpcimageError, UsageError
from hpcimage.image.magic import HEAD_SIZE, head_kind
from hpcimage.linux import spawn, syscalls

EXT_MAGIC_OFFSET = 1080     # the superblock (at 1024) + 56: s_magic
EXT_MAGIC = b"\x53\xef"
EXT_STATE_OFFSET = 1082     # + 58: s_state; bit 0 (EXT2_VALID_FS): unmounted cleanly

FUSE2FS = "fuse2fs"


class DataFs:
    """kind: "squashfs" or "ext3"; offset and size: where the file system lies in
    path (size None: to the end)."""
    __slots__ = ("path", "kind", "offset", "size")

    def __init__(self, path, kind, offset=0, size=None):
        self.path, self.kind, self.offset, self.size = path, kind, offset, size

    def __eq__(self, other):
        return type(self) is type(other) and all(
            getattr(self, k) == getattr(other, k) for k in self.__slots__)

    __hash__ = None

    def __repr__(self):
        return f"DataFs({self.path!r}, {self.kind!r}, {self.offset}, {self.size})"


def locate(path, part_id=None, spec=""):
    """The file system of image file path to bind from; UsageError (exit 2) when path
    is not an image file, has no such partition, or id= is given for a file that is
    not a SIF."""
    what = f"bind {spec!r}: " if spec else ""
    if os.path.isdir(path):
        raise UsageError(f"{what}{path} is a directory, not an image file (image-src "
                         "and id bind from a SquashFS, ext3 or SIF file)")
    try:
        with open(path, "rb") as f:
            head = f.read(HEAD_SIZE)
            f.seek(EXT_MAGIC_OFFSET)
            ext = f.read(2) == EXT_MAGIC
    except OSError as e:
        raise UsageError(f"{what}cannot read {path}: {e.strerror}") from None
    kind = head_kind(head) or ("ext3" if ext else None)
    if kind is None:
        raise UsageError(f"{what}{path} is not an image file (image-src and id bind from "
                         "a SquashFS, ext3 or SIF file)")
    if kind != "sif":
        if part_id is not None:
            raise UsageError(f"{what}id={part_id} selects a SIF partition, and {path} is "
                             f"a {kind} file, not a SIF")
        return DataFs(path, kind)
    from hpcimage.image import sif
    img = sif.open_sif(path)
    if part_id is not None:
        d = next((d for d in img.descriptors if d.id == part_id), None)
        if d is None or d.data_type != sif.DATA_PARTITION:
            raise UsageError(f"{what}{path} has no partition with id {part_id}")
    else:
        d = next((d for d in img.descriptors if d.data_type == sif.DATA_PARTITION
                  and d.parttype == sif.PART_DATA), None)
    if (d is None or sif.encrypted_partition(d)) and sif.encrypted(img):
        raise UsageError(f"{what}{path} is an encrypted SIF: it cannot be bound as data "
                         "(its partition is only readable with its key, at run time)")
    if d is None:
        raise UsageError(f"{what}no data partition found in {path} (id=N names "
                         "another partition)")
    kinds = {sif.FS_SQUASH: "squashfs", sif.FS_EXT3: "ext3"}
    if d.fstype not in kinds:
        raise UsageError(f"{what}partition {d.id} of {path} is {d.fstype_name}: only "
                         "SquashFS and ext3 partitions can be bound")
    return DataFs(path, kinds[d.fstype], d.offset, d.size)


def mount(fs, at, log_path, ro, hold=()):
    """Mount fs (a DataFs) at the directory at; return the FUSE daemon's pid. hold: the
    descriptors of the layer's flock(2), inherited by an ext3 daemon, so that the lock
    lasts until fuse2fs has flushed and exited, not only as long as the container."""
    if fs.kind == "squashfs":
        from hpcimage.image import Image, squashfs
        return squashfs.mount(Image(fs.path, "squashfs", fs.offset, fs.size), at, log_path)
    return _mount_ext3(fs, at, log_path, ro, hold)


def _find(prog):
    for d in (os.environ.get("PATH") or "/usr/bin:/bin").split(":") + ["/usr/sbin", "/sbin"]:
        p = os.path.join(d or ".", prog)
        if os.access(p, os.X_OK):
            return p
    raise HpcimageError("fuse2fs not found: install fuse2fs to bind from ext3 images", 1)


def _mount_ext3(fs, at, log_path, ro, hold=()):
    """fuse2fs in the foreground, a child that dies with the launcher: libfuse 2 mounts
    by itself, so it gets CAP_SYS_ADMIN of the launcher's user namespace as an ambient
    capability (nothing on the host). Waits until the mount is there."""
    prog = _find(FUSE2FS)
    opts = ["ro" if ro else "rw", "fakeroot"]
    if fs.offset:
        opts.append(f"offset={fs.offset}")
    unclean = not ro and not _clean(fs)     # read before fuse2fs marks it mounted
    keep = list(hold)
    path = spawn.hand_over(fs.path, keep)
    # -s: one thread. At exit libfuse 2 cancels its worker threads, and glibc then loads
    # libgcc_s.so.1 by path, which after pivot_root is the container's: fuse2fs aborts
    # before it flushes (SIGABRT, the superblock left "not clean", last writes lost).
    argv = [prog, path, at, "-f", "-s", "-o", ",".join(opts)]
    before = os.stat(at).st_dev
    # SIGHUP when the container ends: fuse2fs flushes libext2fs's cache and marks the
    # file system clean (SIGKILL lost the last writes of a run now and then)
    pid = spawn.spawn_daemon(prog, argv, log_path, keep, (syscalls.CAP_SYS_ADMIN,),
                             deathsig=spawn.signal.SIGHUP)
    try:
        status = spawn.wait_mounted(pid, at, before, 30)
    except TimeoutError:
        raise HpcimageError(f"{fs.path}: fuse2fs did not mount the image in 30 s") from None
    if status is not None:
        raise HpcimageError(_failure(fs, log_path, status))
    if unclean:
        os.write(2, f"hpcimage: warning: {fs.path} was not unmounted cleanly (a container "
                    f"that wrote it was killed): if anything looks wrong, check it with "
                    f"'e2fsck -f {fs.path}' while no container uses it\n".encode())
    return pid


def _clean(fs):
    """The ext3 superblock's state says the file system was unmounted cleanly (or it is
    no ext3 superblock, or cannot be read: fuse2fs will say what is wrong)."""
    try:
        fd = os.open(fs.path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            sb = os.pread(fd, 4, fs.offset + EXT_MAGIC_OFFSET)     # s_magic, s_state
        finally:
            os.close(fd)
    except OSError:
        return True
    return len(sb) < 4 or sb[:2] != EXT_MAGIC or bool(sb[2] & 1)


def _failure(fs, log_path, status):
    why = spawn.why_it_failed(log_path, status)
    return f"{fs.path}: cannot mount ext3 image with fuse2fs: {why}"
