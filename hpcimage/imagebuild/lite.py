"""What the build's path needs of subprocess, shutil, tempfile and json, on os alone.

`hpcimage build` of a busybox image takes ~60 ms before mksquashfs starts, and importing
those four (re, enum, threading, selectors, fnmatch, bz2, lzma, random behind them)
took ~10 ms of it. Everything here behaves as the standard library's counterpart for
the cases the build uses; anything else imports the real module.

    rmtree(path, onerror=None)                  shutil.rmtree, by file descriptors
    copy_file(src, dst)                         shutil.copy2 of a regular file
    gettempdir()                                tempfile.gettempdir
    dumps_labels(labels, sort_keys) -> str      json.dumps(labels, indent=1, ...)
"""
import os


def rmtree(path, onerror=None):
    """shutil.rmtree(path, onerror=onerror): never follows a symbolic link (the tree
    is walked by directory file descriptors); errors go to onerror(func, path,
    exc_info), or are raised when there is none."""
    def err(func, p, e):
        if onerror is None:
            raise e
        onerror(func, p, (type(e), e, e.__traceback__))

    flags = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        fd = os.open(path, flags)
    except OSError as e:
        if os.path.islink(path):
            e = OSError("Cannot call rmtree on a symbolic link")
            err(os.path.islink, path, e)
        else:
            err(os.open, path, e)
        return
    try:
        _rmtree_at(fd, path, flags, err)
    finally:
        os.close(fd)
    try:
        os.rmdir(path)
    except OSError as e:
        err(os.rmdir, path, e)


def _rmtree_at(fd, path, flags, err):
    try:
        with os.scandir(fd) as it:
            entries = list(it)
    except OSError as e:
        err(os.scandir, path, e)
        return
    for ent in entries:
        full = os.path.join(path, ent.name)
        try:
            is_dir = ent.is_dir(follow_symlinks=False)
        except OSError:
            is_dir = False
        if not is_dir:
            try:
                os.unlink(ent.name, dir_fd=fd)
            except OSError as e:
                err(os.unlink, full, e)
            continue
        try:
            sub = os.open(ent.name, flags, dir_fd=fd)
        except OSError as e:
            err(os.open, full, e)
            continue
        try:
            _rmtree_at(sub, full, flags, err)
        finally:
            os.close(sub)
        try:
            os.rmdir(ent.name, dir_fd=fd)
        except OSError as e:
            err(os.rmdir, full, e)


def copy_file(src, dst):
    """shutil.copy2(src, dst) for a regular file: the data (copy_file_range, else
    read/write), the permission bits and the access and modification times."""
    sfd = os.open(src, os.O_RDONLY | os.O_CLOEXEC)
    try:
        st = os.fstat(sfd)
        dfd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            left = st.st_size
            try:
                while left > 0:
                    n = os.copy_file_range(sfd, dfd, left)
                    if n == 0:
                        break
                    left -= n
            except OSError:            # another file system, an old kernel: copy by hand
                os.lseek(sfd, 0, os.SEEK_SET)
                os.lseek(dfd, 0, os.SEEK_SET)
                os.ftruncate(dfd, 0)
                while True:
                    b = os.read(sfd, 1 << 20)
                    if not b:
                        break
                    while b:
                        b = b[os.write(dfd, b):]
            os.fchmod(dfd, st.st_mode & 0o7777)
            os.utime(dfd, ns=(st.st_atime_ns, st.st_mtime_ns))
        finally:
            os.close(dfd)
    finally:
        os.close(sfd)


def gettempdir():
    """tempfile.gettempdir(): $TMPDIR, $TEMP, $TMP, /tmp, /var/tmp, /usr/tmp, the
    current directory: the first that is a directory we may write in."""
    for d in (os.environ.get("TMPDIR"), os.environ.get("TEMP"), os.environ.get("TMP"),
              "/tmp", "/var/tmp", "/usr/tmp", os.getcwd()):
        if d and os.path.isdir(d) and os.access(d, os.W_OK | os.X_OK):
            return os.path.abspath(d)
    import tempfile                    # let it say what is wrong
    return tempfile.gettempdir()


def dumps_labels(labels, sort_keys=False):
    """json.dumps(labels, indent=1, sort_keys=sort_keys), the same text, for a dict of
    strings (anything else goes to json)."""
    try:
        from _json import encode_basestring_ascii as q
    except ImportError:                # not CPython
        q = None
    if q is None or not all(type(k) is str and type(v) is str for k, v in labels.items()):
        import json
        return json.dumps(labels, indent=1, sort_keys=sort_keys)
    if not labels:
        return "{}"
    keys = sorted(labels) if sort_keys else list(labels)
    return "{\n" + ",\n".join(f" {q(k)}: {q(labels[k])}" for k in keys) + "\n}"
