"""The one atomic write: a temporary name in the same directory, the data written and
fsync'ed, renamed into place, then the directory fsync'ed, so that a crash leaves the
old file or the new one and never half of one (DESIGN.md, "Errors and bad input").

Standard library only (os alone): light enough for any room.

    write_atomic(path, data, mode=0o644, tmp=None)    bytes or str (UTF-8)
    with AtomicFile(path, mode) as f: ...             the same for streamed data
    a = AtomicFile(path); a.open(); a.sync(); a.commit() / a.discard()   in steps
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

    Where the decision to rename comes after the data (the store's publish compares
    the new file with the current one; image-update renames its record after it), the
    same steps are methods: `f = a.open()`, write, `a.sync()` (flush and fsync: the
    data is durable at the temporary name), then `a.commit()` (rename and fsync the
    directory) or `a.discard()`; `discard()` after `commit()` does nothing, so a
    `finally: a.discard()` cleans up every other exit.

    tmp: the temporary name (default DIR/.NAME.hpcimage-tmp.PID, which the store's
    clean-up recognises); never followed if a symbolic link. exclusive: fail with
    FileExistsError if it exists (default: truncate it). MODE applies exactly (umask
    does not). Errors: OSError with errno and filename."""

    def __init__(self, path, mode=0o644, tmp=None, exclusive=False):
        d, name = os.path.split(path)
        self.path, self.dir, self.mode = path, d or ".", mode
        self.tmp = tmp or os.path.join(d, f".{name}.hpcimage-tmp.{os.getpid()}")
        self.exclusive = exclusive
        self.file = None
        self.done = False

    def open(self):
        """Create the temporary file; returns it (binary, unbuffered writes via fileno()
        are fine: sync() flushes the buffer first)."""
        flags = os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
        flags |= os.O_EXCL if self.exclusive else os.O_TRUNC
        fd = os.open(self.tmp, flags, self.mode)
        try:
            os.fchmod(fd, self.mode)
        except BaseException:
            os.close(fd)
            self.discard()
            raise
        self.file = os.fdopen(fd, "wb")
        return self.file

    def sync(self):
        """Flush and fsync the data (it is durable at the temporary name)."""
        self.file.flush()
        os.fsync(self.file.fileno())

    def commit(self):
        """sync(), close, rename onto PATH, fsync the directory. On an error the
        temporary file is removed and PATH is untouched."""
        try:
            self.sync()
            self.file.close()
            os.replace(self.tmp, self.path)
        except BaseException:
            self.discard()
            raise
        self.done = True
        fsync_dir(self.dir)

    def discard(self):
        """Close and remove the temporary file, unless commit() renamed it."""
        if self.done:
            return
        self.done = True
        if self.file is not None:
            try:
                self.file.close()
            except OSError:
                pass
        try:
            os.unlink(self.tmp)
        except OSError:
            pass

    def __enter__(self):
        return self.open()

    def __exit__(self, kind, exc, tb):
        if kind is None:
            self.commit()
        else:
            self.discard()
        return False


def write_atomic(path, data, mode=0o644, tmp=None):
    """Write DATA (bytes, or str as UTF-8) to PATH atomically, with MODE (exactly:
    umask does not apply). On any failure the temporary file is removed and the error
    (OSError) raised; PATH is untouched. See AtomicFile for tmp."""
    if isinstance(data, str):
        data = data.encode("utf-8")
    with AtomicFile(path, mode, tmp) as f:
        f.write(data)
