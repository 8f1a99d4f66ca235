"""Conversions between the image formats: sandbox directory, SquashFS file, SIF file.

    hpcimage build OUT.sif   SOURCE      directory | SquashFS | SIF  ->  SIF
    hpcimage build OUT.sqfs  SOURCE      directory | SquashFS | SIF  ->  SquashFS
    hpcimage build --sandbox OUT/ SOURCE directory | SquashFS | SIF  ->  directory

Directories become SquashFS through `mksquashfs SRC OUT -noappend -comp gzip
-exit-on-error`: gzip because every kernel and squashfuse can read it (what Apptainer
defaults to; pass comp="zstd" for faster images where all readers support it).
Ownership, permissions and extended attributes are kept as they are in the directory
(no -all-root): an image built by root from a debootstrap tree has root-owned files, one
built by a user from their own files has that user's uid, as with Apptainer's sandbox
builds. A directory's /.singularity.d/Singularity and /.singularity.d/labels.json go into
the SIF as its definition-file and labels objects.

SquashFS becomes a directory through `unsquashfs -d` (with `-o OFFSET` straight out of a
SIF). Every OUT is built under a temporary name beside it and renamed into place, so a
failure leaves nothing behind; an existing OUT is refused unless force=True.

SOURCE handling is `resolve_source`; a definition file (kind "def": a `.def` name or a
text file whose first statement is `Bootstrap:`) is built by hpcimage.imagebuild.builder.
"""
import os

from hpcimage.errors import HpcimageError, UsageError
from hpcimage.image import sif as _sif
from hpcimage.image.tree import read_small, unsquashfs_cat
from hpcimage.image.magic import SQUASHFS_MAGIC

SQUASHFS_SUFFIXES = (".sqfs", ".squashfs", ".sqsh", ".squash", ".sfs")
SIF_SUFFIXES = (".sif",)
DEFAULT_COMP = "gzip"


class Source:
    """What `hpcimage build` reads from: `kind` is "dir", "squashfs", "sif" or "def"."""

    __slots__ = ("kind", "path")

    def __init__(self, kind, path):
        self.kind = kind
        self.path = path

    def __repr__(self):
        return f"Source({self.kind!r}, {self.path!r})"


def resolve_source(source):
    """Recognise SOURCE: a directory, a SquashFS image, a SIF image or a definition file."""
    path = os.fspath(source)
    if os.path.isdir(path):
        return Source("dir", path)
    try:
        with open(path, "rb") as f:
            head = f.read(64)
    except FileNotFoundError:
        raise UsageError(f"{path}: no such file or directory") from None
    except OSError as e:
        raise UsageError(f"{path}: cannot read: {e.strerror}") from None
    if head[32:42] == _sif.MAGIC:
        return Source("sif", path)
    if head[:4] == SQUASHFS_MAGIC:
        return Source("squashfs", path)
    if path.endswith(".def") or _looks_like_definition(path):
        return Source("def", path)
    raise UsageError(f"{path}: not a directory, SquashFS image or SIF image (nor a definition file)")


def _looks_like_definition(path):
    """The first line that is neither blank nor a comment is `Bootstrap: ...`."""
    try:
        with open(path, "rb") as f:
            head = f.read(8192)
    except OSError:
        return False
    for ln in head.split(b"\n"):
        s = ln.strip()
        if s and not s.startswith(b"#"):
            return s.lower().startswith(b"bootstrap:")
    return False


def output_kind(out, sandbox=False):
    """"sandbox" with --sandbox, else "sif" or "squashfs" from OUT's suffix."""
    if sandbox:
        return "sandbox"
    low = os.fspath(out).lower()
    if low.endswith(SIF_SUFFIXES):
        return "sif"
    if low.endswith(SQUASHFS_SUFFIXES):
        return "squashfs"
    raise UsageError(f"{out}: cannot tell the image format from the name: use a .sif "
                     f"or .sqfs suffix, or --sandbox for a directory")


def build(out, source, sandbox=False, force=False, comp=DEFAULT_COMP, before_install=None):
    """Build OUT from SOURCE; returns the kind of OUT ("sif", "squashfs", "sandbox").
    before_install(), when given, runs once the temporary OUT is complete and may raise
    to abandon it (the build's %test, run while mksquashfs works)."""
    out = os.fspath(out).rstrip("/") or "/"
    src = resolve_source(source) if not isinstance(source, Source) else source
    kind = output_kind(out, sandbox)
    check_out(out, force)
    if os.path.abspath(out) == os.path.abspath(src.path):
        raise UsageError(f"{out}: is SOURCE itself")
    tmp = temp_beside(out)
    try:
        if kind == "sif":
            _build_sif(src, tmp, comp)
        elif kind == "squashfs":
            _build_squashfs(src, tmp, comp)
        else:
            _build_sandbox(src, tmp)
        if before_install is not None:
            before_install()
        install(tmp, out, force)
    except BaseException:
        _remove(tmp)
        raise
    return kind


# ------------------------------------------------------------------------- building

def _build_sif(src, tmp, comp):
    if src.kind == "sif":
        _sif.primary_squashfs(src.path)         # refuse what could not run
        _copy_file(src.path, tmp)
    elif src.kind == "squashfs":
        deffile, labels = squashfs_metadata(src.path)
        _sif.write_sif(tmp, src.path, deffile=deffile, labels=labels)
    else:
        deffile, labels = directory_metadata(src.path)
        sqfs = temp_beside(tmp)
        try:
            dir_to_squashfs(src.path, sqfs, comp)
            _sif.write_sif(tmp, sqfs, deffile=deffile, labels=labels)
        finally:
            _remove(sqfs)


def _build_squashfs(src, tmp, comp):
    if src.kind == "dir":
        dir_to_squashfs(src.path, tmp, comp)
    elif src.kind == "squashfs":
        _copy_file(src.path, tmp)
    else:
        sif_to_squashfs(src.path, tmp)


def _build_sandbox(src, tmp):
    if src.kind == "dir":
        _run(["cp", "-a", "--no-target-directory", "--", src.path, tmp],
             f"{src.path}: copying the directory")
    elif src.kind == "squashfs":
        squashfs_to_sandbox(src.path, tmp)
    else:
        offset, _ = _sif.primary_squashfs(src.path)
        squashfs_to_sandbox(src.path, tmp, offset=offset)


def dir_to_squashfs(src_dir, out_path, comp=DEFAULT_COMP):
    """`mksquashfs SRC OUT -noappend -comp COMP`, ownership kept (see module doc)."""
    _run(["mksquashfs", src_dir, out_path, "-noappend", "-comp", comp,
          "-exit-on-error", "-no-progress", "-quiet"],
         f"{src_dir}: making a SquashFS image")


def sif_to_squashfs(sif_path, out_path):
    """Copy the primary SquashFS partition of a SIF out into its own file."""
    _sif.primary_squashfs(sif_path)             # a SquashFS primary partition, or say why
    img = _sif.SifImage.open(sif_path)
    obj = img.primary_partition().id
    fd = os.open(out_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
    try:
        with os.fdopen(fd, "wb", closefd=False) as f:
            img.copy_object(obj, f.write)
        os.fsync(fd)
    finally:
        os.close(fd)


def squashfs_to_sandbox(sqfs_path, out_dir, offset=0):
    """`unsquashfs -d OUT [-o OFFSET] SQFS`; OUT must not exist yet.

    As root, ownership and all extended attributes are restored; otherwise files
    belong to the caller, only user.* xattrs are set and device nodes are skipped
    (unsquashfs's non-fatal errors, exit 2, are reported as a warning).
    """
    cmd = ["unsquashfs", "-no-progress", "-quiet", "-d", out_dir]
    if offset:
        cmd += ["-o", str(offset)]
    if os.geteuid() != 0:
        cmd.append("-user-xattrs")
    cmd.append(sqfs_path)
    _run(cmd, f"{sqfs_path}: unpacking the SquashFS image", nonfatal=(2,))


def directory_metadata(root):
    """(deffile, labels) bytes from ROOT/.singularity.d, None where absent."""
    meta = os.path.join(root, ".singularity.d")
    try:
        st = os.lstat(meta)
    except FileNotFoundError:
        return None, None
    import stat
    if not stat.S_ISDIR(st.st_mode):
        return None, None
    return (read_small(os.path.join(meta, "Singularity")),
            read_small(os.path.join(meta, "labels.json")))


def squashfs_metadata(sqfs_path, offset=0):
    """(deffile, labels) bytes from inside a SquashFS image, None where absent."""
    return (unsquashfs_cat(sqfs_path, ".singularity.d/Singularity", offset),
            unsquashfs_cat(sqfs_path, ".singularity.d/labels.json", offset))


# -------------------------------------------------------------------------- helpers

def check_out(out, force):
    if os.path.lexists(out) and not force:
        raise UsageError(f"{out}: already exists (use --force to overwrite it)")
    parent = os.path.dirname(os.path.abspath(out))
    if not os.path.isdir(parent):
        raise UsageError(f"{out}: directory {parent} does not exist")
    if os.path.lexists(os.path.join(parent, "hpcimage-manifest.json")):
        # The store is written through `hpcimage publish` only (manifest, previous
        # versions): a build there would replace a file behind the manifest's back.
        raise UsageError(f"{out}: {parent} is an image store (it has hpcimage-manifest.json): "
                         "build elsewhere and 'hpcimage publish' the image, or use "
                         "'hpcimage build --all'")


def temp_beside(path):
    d, base = os.path.split(os.path.abspath(path))
    return os.path.join(d, f".{base}.tmp-{os.getpid()}-{os.urandom(4).hex()}")


def install(tmp, out, force):
    """Rename the finished TMP to OUT, replacing OUT only when force is set."""
    if not os.path.lexists(out):
        os.rename(tmp, out)
        return
    if not force:
        raise UsageError(f"{out}: already exists (use --force to overwrite it)")
    if not os.path.isdir(tmp) and not (os.path.isdir(out) and not os.path.islink(out)):
        os.replace(tmp, out)            # file over file or symlink: one atomic step
        return
    old = temp_beside(out)
    os.rename(out, old)
    try:
        os.rename(tmp, out)
    except BaseException:
        os.rename(old, out)
        raise
    _remove(old)


def _remove(path):
    import shutil
    try:
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        else:
            os.unlink(path)
    except FileNotFoundError:
        pass


def _copy_file(src, dst):
    """Stream SRC to a new file DST (holes kept), fsync'd."""
    sfd = os.open(src, os.O_RDONLY | os.O_CLOEXEC)
    try:
        dfd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC,
                      os.fstat(sfd).st_mode & 0o777)
        try:
            size = _sif._copy_sparse(sfd, dfd, 0)
            os.ftruncate(dfd, size)
            os.fsync(dfd)
        finally:
            os.close(dfd)
    finally:
        os.close(sfd)


def _run(cmd, what, nonfatal=()):
    import subprocess
    from hpcimage.linux import procstate
    try:
        r = subprocess.run(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, close_fds=False,
                           preexec_fn=procstate.for_exec)   # the caller's signal state
    except FileNotFoundError:
        hint = " (install squashfs-tools)" if "squashfs" in cmd[0] else ""
        raise HpcimageError(f"{what}: {cmd[0]} not found{hint}") from None
    rc, out = r.returncode, r.stdout
    if rc == 0:
        return
    lines = [ln.strip() for ln in out.decode(errors="replace").splitlines() if ln.strip()]
    if rc in nonfatal:
        import sys
        for ln in lines[-5:]:
            print(f"hpcimage: warning: {cmd[0]}: {ln}", file=sys.stderr)
        return
    detail = lines[-1] if lines else "no output"
    raise HpcimageError(f"{what}: {cmd[0]} failed (exit {rc}): {detail}")
