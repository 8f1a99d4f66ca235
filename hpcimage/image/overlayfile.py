"""Making overlay files: `hpcimage overlay create` and the site's personal overlays.

An overlay file is an ext3 file system made by `mkfs.ext3 -d` from a directory that
holds `upper/` and `work/` (the layout Apptainer's `overlay create` makes; `--create-dir`
adds directories below upper/), mode 0755 (0777 when the uid or gid is above 65535),
owned by the caller, or with fakeroot by root: mkfs.ext3 then runs as root of a user
namespace that maps only the caller's ids (its files are the caller's, shown as 0).
A new file is written at a temporary name beside FILE and renamed into place (fsutil);
an existing SIF gets the ext3 as one more partition (Overlay, Ext3; image.sif
append_partition, atomic too), refused where the SIF is signed or encrypted or already
has an ext3 overlay. Errors: HpcimageError, exit 2 for bad input (a size under 64 MiB,
FILE exists and is not a SIF, a directory outside upper/), 1 for a failed operation
(no mkfs.ext3, mkfs.ext3 failed). subprocess and tempfile are imported on call only:
the runtime calls `create` once for a personal overlay.
"""
import os

from hpcimage import fsutil
from hpcimage.errors import HpcimageError
from hpcimage.linux.paths import which

DEFAULT_SIZE = 64           # MiB, Apptainer's default and minimum
MIN_SIZE = 64
MKFS = "mkfs.ext3"
SBIN = "/usr/local/sbin:/usr/sbin:/sbin"


def find_mkfs(environ=None):
    environ = os.environ if environ is None else environ
    path = (environ.get("PATH") or os.defpath) + ":" + SBIN
    found = which(MKFS, path)
    if not found:
        raise HpcimageError(f"overlay create: {MKFS} not found (install e2fsprogs)", 1)
    return found


def _fakeroot_child(uid, gid):
    """preexec_fn: root of a user namespace mapping only uid/gid (mkfs.ext3 then
    records the caller's files as root's)."""
    def enter():
        from hpcimage.linux import syscalls as sc
        sc.unshare(sc.CLONE_NEWUSER)
        for name, text in (("setgroups", "deny"), ("uid_map", f"0 {uid} 1\n"),
                           ("gid_map", f"0 {gid} 1\n")):
            with open(f"/proc/self/{name}", "w") as f:
                f.write(text)
    return enter


def _layout(top, dirs):
    """upper/, work/ and upper/DIR for each of dirs below top; the mode Apptainer gives."""
    perm = 0o777 if os.getuid() > 65535 or os.getgid() > 65535 else 0o755
    upper = os.path.join(top, "upper")
    made = [upper, os.path.join(top, "work")]
    for d in dirs:
        # joined onto upper/ as Apptainer's filepath.Join(upperDir, dir): /opt/x is
        # upper/opt/x; what leaves upper/ (../x) is refused
        full = os.path.normpath(upper + "/" + d)
        rel = os.path.relpath(full, upper)
        if rel == "." or rel == ".." or rel.startswith("../"):
            raise HpcimageError(f"overlay create: --create-dir {d!r}: not a directory "
                                "below upper/", 2)
        path = upper
        for part in rel.split("/"):
            path = os.path.join(path, part)
            made.append(path)
    for p in made:
        os.makedirs(p, exist_ok=True)
        os.chmod(p, perm)


def _mkfs(mkfs, src, target, fakeroot, sparse):
    import subprocess
    uid, gid = os.getuid(), os.getgid()
    pre = _fakeroot_child(uid, gid) if fakeroot and uid != 0 else None
    # not sparse: the blocks stay allocated (mke2fs would punch them out again)
    more = [] if sparse else ["-E", "nodiscard"]
    r = subprocess.run([mkfs, "-q", "-F", *more, "-d", src, target], stdin=subprocess.DEVNULL,
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, preexec_fn=pre)
    if r.returncode != 0:
        out = r.stdout.decode(errors="replace").strip() or f"status {r.returncode}"
        raise HpcimageError(f"overlay create: {MKFS} failed: {out.splitlines()[-1]}", 1)


def _size(size):
    try:
        n = int(size)
    except (TypeError, ValueError):
        raise HpcimageError(f"overlay create: --size {size!r}: want a number of MiB", 2) \
            from None
    if n < MIN_SIZE:
        raise HpcimageError(f"overlay create: --size {n}: an overlay needs at least "
                            f"{MIN_SIZE} MiB", 2)
    return n


def _check_sif(path):
    from hpcimage.image import sif
    img = sif.SifImage.open(path)
    if sif.signed(img):
        raise HpcimageError(f"overlay create: {path} is a signed SIF: adding an overlay "
                            "partition would break its signature", 2)
    if sif.encrypted(img):
        raise HpcimageError(f"overlay create: {path} is an encrypted SIF: hpcimage cannot "
                            "add an overlay partition to it", 2)
    for d in img.descriptors:
        if d.data_type == sif.DATA_PARTITION and d.parttype == sif.PART_OVERLAY \
                and d.fstype == sif.FS_EXT3:
            raise HpcimageError(f"overlay create: {path} already has an ext3 overlay "
                                f"partition (object {d.id})", 2)


def create(path, size=DEFAULT_SIZE, sparse=False, dirs=(), fakeroot=False, environ=None,
           exist_ok=False):
    """Make the overlay FILE (module doc); returns "ext3" or "sif" (what was written).
    exist_ok (a personal overlay, which two launches may make at once): a new file is
    linked into place, never over another; a FILE that exists (before, or made
    meanwhile) is left as it is ("exists")."""
    import tempfile
    path = os.fspath(path)
    n = _size(size)
    kind = "ext3"
    if exist_ok and os.path.lexists(path):
        return "exists"
    if os.path.lexists(path):
        from hpcimage.image.magic import head_kind
        try:
            with open(path, "rb") as f:
                head = f.read(4096)
        except OSError as e:
            raise HpcimageError(f"overlay create: {path}: {e.strerror}", 2) from None
        if head_kind(head) != "sif":
            raise HpcimageError(f"overlay create: {path} exists (and is not a SIF image, "
                                "to which a partition could be added)", 2)
        if not os.access(path, os.W_OK):
            raise HpcimageError(f"overlay create: {path}: you cannot write this SIF image",
                                2)
        _check_sif(path)
        kind = "sif"
    d = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(d):
        raise HpcimageError(f"overlay create: {d}: no such directory", 2)
    mkfs = find_mkfs(environ)
    with tempfile.TemporaryDirectory(prefix="hpcimage-overlay-") as top:
        tree = os.path.join(top, "tree")
        os.mkdir(tree)
        _layout(tree, dirs)
        target = path if kind == "ext3" else os.path.join(top, "overlay.ext3")
        a = fsutil.AtomicFile(target, 0o600, exclusive=True)
        try:
            try:
                f = a.open()
                if sparse:
                    f.truncate(n << 20)
                else:
                    f.flush()
                    os.posix_fallocate(f.fileno(), 0, n << 20)
                f.flush()
            except OSError as e:
                raise HpcimageError(f"overlay create: {path}: {e.strerror}", 1) from None
            _mkfs(mkfs, tree, a.tmp, fakeroot, sparse)
            a.sync()
            if exist_ok:
                try:
                    os.link(a.tmp, target)      # never over one made meanwhile
                except FileExistsError:
                    return "exists"
                fsutil.fsync_dir(d)
            else:
                a.commit()
        finally:
            a.discard()
        if kind == "sif":
            from hpcimage.image import sif
            sif.append_partition(path, target, sif.FS_EXT3, sif.PART_OVERLAY)
    return kind
