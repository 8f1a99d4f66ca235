"""The one atomic write: a temporary name in the same directory, the data written and
fsync'ed, renamed into place, then the directory fsync'ed, so that a crash leaves the
old file or the new one and never half of one (DESIGN.md, "Errors and bad input").

Standard library only (os alone): light enough for any room.

    write_atomic(path, data, mode=0o644, tmp=None)    bytes or str (UTF-8)
    with AtomicFile(path, mode) as f: ...             the same for streamed data
    fsync_dir(path)                                   best effort
"""
import os


def fsync_dir(path):
    """fsync the directory PATH (a rename in it is then durable); errors are ignored."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class AtomicFile:
    """`with AtomicFile(path, mode) as f:` a binary file at a temporary name in PATH's
    directory; when the block ends without an exception the data is fsync'ed and
    renamed onto PATH, then the directory fsync'ed; on an exception the temporary file
    is removed and PATH is untouched. For data that is streamed (a download) rather
    than held (write_atomic).

    tmp: the temporary name (default DIR/.NAME.hpcimage-tmp.PID, which the store's
    clean-up recognises); never followed if a symbolic link. MODE applies exactly
    (umask does not)."""

    def __init__(self, path, mode=0o644, tmp=None):
        d, name = os.path.split(path)
        self.path, self.dir, self.mode = path, d or ".", mode
        self.tmp = tmp or os.path.join(d, f".{name}.hpcimage-tmp.{os.getpid()}")
        self.file = None

    def __enter__(self):
        fd = os.open(self.tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW
                     | os.O_CLOEXEC, self.mode)
        try:
            os.fchmod(fd, self.mode)
        except BaseException:
            os.close(fd)
            self._discard()
            raise
        self.file = os.fdopen(fd, "wb")
        return self.file

    def __exit__(self, kind, exc, tb):
        try:
            if kind is None:
                self.file.flush()
                os.fsync(self.file.fileno())
            self.file.close()
            if kind is None:
                os.replace(self.tmp, self.path)
        except BaseException:
            self._discard()
            raise
        if kind is not None:
            self._discard()
            return False
        fsync_dir(self.dir)
        return False

    def _discard(self):
        try:
            os.unlink(self.tmp)
        except OSError:
            pass


def write_atomic(path, data, mode=0o644, tmp=None):
    """Write DATA (bytes, or str as UTF-8) to PATH atomically, with MODE (exactly:
    umask does not apply). On any failure the temporary file is removed and the error
    (OSError) raised; PATH is untouched. See AtomicFile for tmp."""
    if isinstance(data, str):
        data = data.encode("utf-8")
    with AtomicFile(path, mode, tmp) as f:
        f.write(data)
