"""Reading files of an image of any kind (directory, SquashFS, SIF) without mounting it:
a directory's files directly (never through a symbolic link), a SquashFS's through
`unsquashfs -cat` at the partition's offset (SIF). Only small metadata files."""
import os

from hpcimage.errors import UsageError

METADATA_LIMIT = 16 << 20       # a definition file or labels.json larger than this is refused


def read_small(path):
    """A regular file's bytes (never through a symlink: it could point off the tree)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError:
        return None
    try:
        import stat
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            return None
        if st.st_size > METADATA_LIMIT:
            raise UsageError(f"{path}: {st.st_size} bytes, larger than the "
                             f"{METADATA_LIMIT >> 20} MiB a SIF metadata object may be")
        with os.fdopen(fd, "rb", closefd=False) as f:
            return f.read(METADATA_LIMIT + 1)[:METADATA_LIMIT]
    finally:
        os.close(fd)


def unsquashfs_cat(sqfs_path, inner, offset=0):
    cmd = ["unsquashfs", "-cat"]
    if offset:
        cmd += ["-o", str(offset)]
    cmd += [sqfs_path, inner]
    import subprocess
    try:
        p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    except OSError:
        return None
    with p:
        data = p.stdout.read(METADATA_LIMIT + 1)
        if len(data) > METADATA_LIMIT:
            p.kill()
            p.wait()
            return None
        p.stdout.read()
        rc = p.wait()
    return data if rc == 0 else None


class Reader:
    """Small files and directory listings of an opened image (dir, SquashFS, SIF),
    without mounting it."""

    def __init__(self, image):
        self.image = image

    def cat(self, inner):
        if getattr(self.image, "crypt", None):
            return None         # encrypted (gocryptfs): nothing inside is in clear
        if self.image.kind == "sandbox":
            return read_small(os.path.join(self.image.path, inner))
        return unsquashfs_cat(self.image.path, inner, self.image.offset)

    def listdir(self, inner):
        if getattr(self.image, "crypt", None):
            return []
        if self.image.kind == "sandbox":
            try:
                return sorted(os.listdir(os.path.join(self.image.path, inner)))
            except OSError:
                return []
        cmd = ["unsquashfs", "-lc"]
        if self.image.offset:
            cmd += ["-o", str(self.image.offset)]
        cmd += [self.image.path, inner]
        import subprocess
        r = subprocess.run(cmd, capture_output=True, text=True)
        prefix = "squashfs-root/" + inner.strip("/") + "/"
        names = set()
        for ln in r.stdout.splitlines():
            if ln.startswith(prefix):
                names.add(ln[len(prefix):].split("/")[0])
        return sorted(n for n in names if n)
