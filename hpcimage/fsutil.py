"""The one atomic write: a temporary name in the same directory, the data written and
fsync'ed, renamed into place, then the directory fsync'ed, so that a crash leaves the
old file or the new one and never half of one (DESIGN.md, "Errors and bad input").

Standard library only (os alone): light enough for any room.

    write_atomic(path, data, mode=0o644, tmp=None)    bytes or str (UTF-8)
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


def write_atomic(path, data, mode=0o644, tmp=None):
    """Write DATA to PATH atomically, with MODE (exactly: umask does not apply).

    tmp: the temporary name (default DIR/.NAME.hpcimage-tmp.PID, which the store's
    clean-up recognises); it is never followed if a symbolic link. On any failure the
    temporary file is removed and the error (OSError) raised; PATH is untouched."""
    d, name = os.path.split(path)
    if tmp is None:
        tmp = os.path.join(d, f".{name}.hpcimage-tmp.{os.getpid()}")
    if isinstance(data, str):
        data = data.encode("utf-8")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC,
                     mode)
        try:
            os.fchmod(fd, mode)
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    fsync_dir(d or ".")
