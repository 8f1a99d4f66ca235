"""Overlays (`--overlay PATH[:ro]`, `--writable-tmpfs`, a SIF's overlay partition):
recognised without mounting. `layers(specs, ...)` turns the raw specs (opts.overlays,
in order) into Layer objects and checks the rules: any number read-only, at most one
writable (it goes on top), a SquashFS always read-only. The runtime mounts them
(runtime.ops.OverlayLayer, OverlayMount). Standard library only: the runtime imports
it on the hot path, only when an overlay is asked for.

Layout, as Apptainer's: a directory holds `upper/` and `work/` (created when missing
for a writable one; a read-only one without `upper/` is used as it is); an ext3 image
holds them at its root (`hpcimage overlay create` makes them); a SquashFS file is used
as it is.
"""
import os

from hpcimage.errors import UsageError
from hpcimage.image.magic import HEAD_SIZE, head_kind

EXT_MAGIC_OFFSET = 1080     # the superblock (at 1024) + 56: s_magic
EXT_MAGIC = b"\x53\xef"

# Apptainer's `sessiondir max size` default (MiB): --writable-tmpfs's size.
TMPFS_MIB = 64

# statfs(2) f_type of the file systems the kernel's overlayfs cannot use as an upper
# layer from a user namespace (FUSE; tmpfs before Linux 6.6: no user.* xattrs).
FUSE_MAGIC = 0x65735546
TMPFS_MAGIC = 0x01021994
DRIVERS = ("auto", "kernel", "fuse-overlayfs")
DRIVER_VARIABLE = "HPCIMAGE_OVERLAY_DRIVER"


# Left beside upper/ and work/ of a layer fuse-overlayfs has written (runtime.overlay):
# such a layer is read with fuse-overlayfs from then on (runtime.steps.overlay).
FUSE_MARK = ".fuse-overlayfs"

class Layer:
    """One layer: spec (as given, for messages), path (absolute), kind ("dir",
    "squashfs", "ext3", "tmpfs"), offset and size (where the file system lies in
    path: a SIF's partition), writable, size_mib (tmpfs); personal: the site's
    personal overlay of the loaded module (runtime.request), for its messages."""
    __slots__ = ("spec", "path", "kind", "offset", "size", "writable", "size_mib",
                 "personal")

    def __init__(self, spec, path, kind, writable, offset=0, size=None, size_mib=None):
        self.spec, self.path, self.kind, self.writable = spec, path, kind, writable
        self.offset, self.size, self.size_mib = offset, size, size_mib
        self.personal = False

    def __eq__(self, other):
        return type(self) is type(other) and all(
            getattr(self, k) == getattr(other, k) for k in self.__slots__)

    __hash__ = None

    def __repr__(self):
        return (f"Layer({self.path!r}, {self.kind!r}, "
                f"{'rw' if self.writable else 'ro'}, offset={self.offset})")

    def describe(self):
        where = f", the overlay partition at offset {self.offset}" if self.offset else ""
        if self.kind == "tmpfs":
            return f"tmpfs of {self.size_mib} MiB, gone at the end"
        return f"{self.kind}{where}, {'writable' if self.writable else 'read-only'}"


def split_spec(spec):
    """PATH[:ro|:rw] -> (path, writable)."""
    path, sep, mode = spec.rpartition(":")
    if sep and mode in ("ro", "rw") and path:
        return path, mode == "rw"
    if sep and "/" not in mode and mode and path:
        raise UsageError(f"--overlay {spec}: unknown mode {mode!r} (PATH, PATH:ro or PATH:rw)")
    return spec, True


def layer(spec, cwd=None):
    """The Layer of one --overlay spec; UsageError (exit 2) for a missing or unknown
    file."""
    raw, writable = split_spec(spec)
    if not raw:
        raise UsageError("--overlay needs a path")
    path = os.path.normpath(os.path.join(cwd or os.getcwd(), os.path.expanduser(raw)))
    try:
        if os.path.isdir(path):
            return Layer(spec, path, "dir", writable)
        with open(path, "rb") as f:
            head = f.read(HEAD_SIZE)
            f.seek(EXT_MAGIC_OFFSET)
            ext = f.read(2) == EXT_MAGIC
    except FileNotFoundError:
        raise UsageError(f"--overlay {spec}: {path}: no such file or directory") from None
    except OSError as e:
        raise UsageError(f"--overlay {spec}: cannot read {path}: {e.strerror}") from None
    kind = head_kind(head) or ("ext3" if ext else None)
    if kind == "squashfs":
        return Layer(spec, path, "squashfs", False)      # always read-only, as Apptainer
    if kind == "ext3":
        return Layer(spec, path, "ext3", writable)
    if kind == "sif":
        part = sif_overlay(path)
        if part is None:
            raise UsageError(f"--overlay {spec}: {path} is a SIF without an overlay partition")
        return Layer(spec, path, "ext3", writable, part[0], part[1])
    raise UsageError(f"--overlay {spec}: {path} is not an overlay (a directory, an ext3 "
                     "image, a SquashFS file or a SIF with an overlay partition)")


def sif_overlay(path):
    """(offset, size) of the ext3 overlay partition of the SIF at path, else None."""
    from hpcimage.image import sif
    img = sif.open_sif(path)
    for d in img.descriptors:
        if d.data_type == sif.DATA_PARTITION and d.parttype == sif.PART_OVERLAY:
            if d.fstype != sif.FS_EXT3:
                raise UsageError(f"{path}: overlay partition {d.id} is {d.fstype_name}, "
                                 "not ext3")
            return d.offset, d.size
    return None


def layers(specs, image, writable=False, writable_tmpfs=False, tmpfs_mib=TMPFS_MIB,
           cwd=None, warnings=None):
    """The overlay layers of a launch, bottom first (the image not included): the
    image's own SIF overlay partition (read-only, or writable with --writable), then
    specs in order (the read-only ones, then the writable one on top), then the
    --writable-tmpfs layer where no layer is writable. warnings: a list that gets
    what is said before the launch."""
    out = []
    if image.kind == "sif":
        part = sif_overlay(image.path)
        if part is not None:
            out.append(Layer(image.path, image.path, "ext3", writable, part[0], part[1]))
        elif writable:
            raise UsageError(f"--writable: {image.path} is a SIF image: writing it needs an "
                             f"overlay partition (hpcimage overlay create {image.path}; or use "
                             "--overlay or --writable-tmpfs)")
    # --writable on a sandbox directory or a SquashFS file: runtime.steps.writable_image
    for spec in specs:
        out.append(layer(spec, cwd))
    rw = [x for x in out if x.writable]
    if len(rw) > 1:
        raise UsageError("at most one writable overlay: " + ", ".join(x.spec for x in rw)
                         + " (add :ro to the others)")
    if rw:
        out.remove(rw[0])
        out.append(rw[0])
        if writable_tmpfs and warnings is not None:
            warnings.append(f"--writable-tmpfs ignored: the writable overlay {rw[0].spec} "
                            "takes the writes")
    elif writable_tmpfs:
        out.append(Layer("--writable-tmpfs", None, "tmpfs", True, size_mib=tmpfs_mib))
    seen = {}
    for x in out:
        if x.path is not None and (x.path, x.offset) in seen:
            raise UsageError(f"--overlay {x.spec}: {x.path} is given twice")
        seen[(x.path, x.offset)] = x
    return out


def kernel_release(release=None):
    """(major, minor) of the running kernel (os.uname: no file read)."""
    rel = release or os.uname().release
    parts = []
    for word in rel.split(".")[:2]:
        digits = ""
        for c in word:
            if not c.isdigit():
                break
            digits += c
        parts.append(int(digits or 0))
    return tuple(parts + [0] * (2 - len(parts)))


def kernel_can(upper_fstype, release=None):
    """Whether the kernel's overlayfs can serve a launch from a user namespace whose
    writable layer lies on a file system of statfs type upper_fstype (None: no
    writable layer): Linux 5.11 (userxattr), not on FUSE, on tmpfs from 6.6."""
    k = kernel_release(release)
    if k < (5, 11):
        return False
    if upper_fstype == FUSE_MAGIC:
        return False
    if upper_fstype == TMPFS_MAGIC and k < (6, 6):
        return False
    return True
