"""The central image store: `hpcimage publish` (administrator) and `image-update` (user).

Publish places an image at the path site.yaml gives for a name and version and records
it in the manifest of that store directory:

    STOREDIR/NAME                          the current image (0644)
    STOREDIR/hpcimage-manifest.json        the manifest (0644), rewritten atomically
    STOREDIR/.hpcimage.lock                publishers' flock (one publish at a time)
    STOREDIR/.hpcimage-previous/SHA-NAME   previous versions (site.yaml `keep`)
    STOREDIR/.NAME.hpcimage-tmp.PID        a copy in progress (removed by the next run)

    {"images": {"NAME": {"module": "Name/version",
                         "current": {"sha256", "size", "mtime_ns", "published",
                                     "build_date", "definition_sha256", "source", "file"},
                         "previous": [entries, newest first]}},
     "version": 1, "_comment": ...}

Order of a publish: copy to a temporary name (hashing while copying), fsync; hard-link
the old file into .hpcimage-previous; rename the new one into place; then rewrite the
manifest (temporary name, fsync, rename). A reader therefore sees an old or a new
image and an old or a new manifest, never half of one; between the two renames the
file does not match the manifest's size/mtime, which image-update notices and waits
out.

`image-update` copies the module's image into the user's local image directory (see
hpcimage.runtime.localcopy for the layout and for how the wrappers choose), verifying the
sha256 while it copies, under a flock beside the copy, and renames it into place.
"""
import errno
import fcntl
import hashlib
import json
import os
import shutil
import stat
import sys
import time

from hpcimage.errors import HpcimageError, UsageError
from hpcimage.runtime import localcopy as local

MANIFEST = local.MANIFEST
MANIFEST_VERSION = 1
STORE_LOCK = ".hpcimage.lock"
PREVIOUS = ".hpcimage-previous"
TMP_MARK = ".hpcimage-tmp."
CHUNK = 8 << 20                    # copy buffer
PROGRESS_MIN = 4 << 20             # no progress bar below this size
MANIFEST_WAIT = 2.0                # seconds image-update waits out a publish in progress
HEADER = ("written by hpcimage publish -- do not edit; "
          "'hpcimage publish IMAGE --name N --version V' updates it")


# --------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------

def _now_iso(t=None):
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() if t is None else t))


def _mib(n):
    return f"{n / (1 << 20):.1f} MiB"


def _fsync_dir(path):
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


def _makedirs(path, mode=0o755):
    try:
        os.makedirs(path, mode=mode, exist_ok=True)
    except FileExistsError:
        raise HpcimageError(f"cannot create directory {path}: a file is in the way") from None
    except OSError as e:
        raise HpcimageError(f"cannot create directory {path}: {e.strerror}") from None
    if not os.path.isdir(path):
        raise HpcimageError(f"cannot create directory {path}: a file is in the way")


def _pid_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_temps(directory, prefix_name=None, all_stale=True):
    """Remove `.NAME.hpcimage-tmp.PID` files in `directory` (only NAME's when given).

    The caller holds the lock that writers of these files hold, so every one is
    stale; with all_stale=False only those whose PID is dead go. Returns the names."""
    removed = []
    try:
        names = os.listdir(directory)
    except OSError:
        return removed
    want = None if prefix_name is None else f".{prefix_name}{TMP_MARK}"
    for n in names:
        if not n.startswith(".") or TMP_MARK not in n:
            continue
        if want is not None and not n.startswith(want):
            continue
        pid = n.rpartition(TMP_MARK)[2].split(".")[0]     # PID or PID.state
        if not pid.isdigit():
            continue
        if not all_stale and _pid_alive(int(pid)):
            continue
        try:
            os.unlink(os.path.join(directory, n))
            removed.append(n)
        except FileNotFoundError:
            pass
        except OSError:
            pass
    return removed


class Lock:
    """fcntl.flock on a lock file; `wait_message` is shown (on a tty) while waiting.

    Where the file system has no locks (ENOLCK, EOPNOTSUPP: an NFS mount without lockd)
    it warns and goes on unlocked; `locked` then is False."""

    def __init__(self, path, shared=False, create_mode=0o644, wait_message=None, err=None,
                 prog="hpcimage"):
        self.path = path
        self.prog = prog
        self.shared = shared
        self.create_mode = create_mode
        self.wait_message = wait_message
        self.err = err or sys.stderr
        self.fd = None
        self.locked = False

    def __enter__(self):
        flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
        try:
            self.fd = os.open(self.path, flags, self.create_mode)
        except OSError as e:
            if e.errno == errno.ELOOP:
                raise HpcimageError(f"{self.path} is a symbolic link: refusing to use it "
                                    "as a lock file; remove it") from None
            raise HpcimageError(f"cannot open lock file {self.path}: {e.strerror}") from None
        op = fcntl.LOCK_SH if self.shared else fcntl.LOCK_EX
        try:
            try:
                fcntl.flock(self.fd, op | fcntl.LOCK_NB)
            except BlockingIOError:
                if self.wait_message and _isatty(self.err):
                    self.err.write(self.wait_message + "\n")
                    self.err.flush()
                fcntl.flock(self.fd, op)
            self.locked = True
        except OSError as e:
            if e.errno in (errno.ENOLCK, errno.EOPNOTSUPP):
                self.err.write(f"{self.prog}: warning: cannot lock {self.path} ({e.strerror}): "
                               "going on without the lock\n")
                return self
            os.close(self.fd)
            self.fd = None
            raise HpcimageError(f"cannot lock {self.path}: {e.strerror}") from None
        return self

    def __exit__(self, *exc):
        if self.fd is not None:
            os.close(self.fd)        # releases the flock
            self.fd = None


def _isatty(stream):
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


# --------------------------------------------------------------------------
# Copying while hashing
# --------------------------------------------------------------------------

class Progress:
    """A one-line progress bar on a terminal; silent elsewhere or for small copies.

    Each redraw is `\r`, the line, then "clear to the end of the line" (ESC [K); the
    line fits the terminal's width at that moment (TIOCGWINSZ: a resized window is
    followed), dropping the rate, then the sizes, then shortening the bar and the
    label, so that it never wraps into a stale second line."""

    WIDTH = 30          # the bar's width where there is room
    MIN_BAR = 10

    def __init__(self, label, total, stream=None, force=None):
        self.stream = stream or sys.stderr
        show = _isatty(self.stream) if force is None else force
        self.on = show and total >= PROGRESS_MIN
        self.label = label
        self.total = max(total, 1)
        self.start = time.monotonic()
        self.last = 0.0

    def columns(self):
        try:
            return os.get_terminal_size(self.stream.fileno()).columns or 80
        except (AttributeError, ValueError, OSError):
            return shutil.get_terminal_size().columns

    def line(self, done, rate, columns):
        """The text of the bar for `done` bytes at `rate` bytes/s, at most columns - 1
        characters (the last column would make some terminals wrap)."""
        room = max(columns - 1, 1)
        frac = min(done / self.total, 1.0)
        pct = f" {frac * 100:3.0f}%"
        tails = (f"{pct} {_mib(done)} of {_mib(self.total)} {rate / (1 << 20):.0f} MiB/s",
                 f"{pct} {_mib(done)} of {_mib(self.total)}", pct)
        label = self.label
        for tail in tails:
            bar = min(room - len(label) - 3 - len(tail), self.WIDTH)
            if bar >= self.MIN_BAR:
                break
        else:
            bar = self.MIN_BAR
            label = label[:max(room - 3 - bar - len(tail), 0)]
        fill = int(frac * bar)
        return f"{label} [{'#' * fill}{'.' * (bar - fill)}]{tail}"[:room]

    def update(self, done, final=False):
        if not self.on:
            return
        now = time.monotonic()
        if not final and now - self.last < 0.1:
            return
        self.last = now
        rate = done / max(now - self.start, 1e-6)
        self.stream.write("\r" + self.line(done, rate, self.columns()) + "\x1b[K")
        self.stream.flush()

    def close(self, done=None):
        """Finish the line (the bar at `done`, or as it stands after a failure)."""
        if self.on:
            if done is not None:
                self.update(done, final=True)
            self.stream.write("\n")
            self.stream.flush()
            self.on = False


def _write_all(fd, view):
    while view:
        n = os.write(fd, view)
        view = view[n:]


def copy_hashing(src, dst, size, progress=None, chunk=CHUNK):
    """Copy `size` bytes from fd `src` to fd `dst` in one pass, hashing what is
    written -> sha256 hex digest. A writer thread writes one buffer while the next is
    read and hashed (hashlib and os.write release the GIL). Raises OSError; raises
    HpcimageError when the source ends early or grows."""
    h = hashlib.sha256()
    try:
        os.posix_fadvise(src, 0, 0, os.POSIX_FADV_SEQUENTIAL)
    except (OSError, AttributeError):
        pass
    done = 0
    if size <= 2 * chunk:
        buf = bytearray(min(chunk, max(size, 1) + 1))
        view = memoryview(buf)
        while True:
            n = os.readv(src, [buf])
            if not n:
                break
            h.update(view[:n])
            _write_all(dst, view[:n])
            done += n
            if progress:
                progress.update(done)
    else:
        import queue
        import threading
        free = queue.Queue()
        for _ in range(3):
            free.put(bytearray(chunk))
        work = queue.Queue()
        failed = []

        def writer():
            while True:
                item = work.get()
                if item is None:
                    return
                b, n = item
                if not failed:
                    try:
                        _write_all(dst, memoryview(b)[:n])
                    except BaseException as e:   # noqa: B902 -- handed to the reader
                        failed.append(e)
                free.put(b)

        t = threading.Thread(target=writer, name="hpcimage-copy-writer", daemon=True)
        t.start()
        try:
            while not failed:
                b = free.get()
                n = os.readv(src, [b])
                if not n:
                    free.put(b)
                    break
                h.update(memoryview(b)[:n])
                work.put((b, n))
                done += n
                if progress:
                    progress.update(done)
        finally:
            work.put(None)
            t.join()
        if failed:
            raise failed[0]
    if done != size:
        raise HpcimageError(f"the source changed while it was copied ({done} bytes read, "
                            f"{size} expected)")
    return h.hexdigest()


def hash_file(path):
    h = hashlib.sha256()
    with open(path, "rb", buffering=0) as f:
        buf = bytearray(CHUNK)
        view = memoryview(buf)
        while True:
            n = f.readinto(buf)
            if not n:
                break
            h.update(view[:n])
    return h.hexdigest()


# --------------------------------------------------------------------------
# The manifest
# --------------------------------------------------------------------------

def empty_manifest():
    return {"_comment": HEADER, "images": {}, "version": MANIFEST_VERSION}


def load_manifest(directory):
    """The manifest of `directory` (an empty one when it has none)."""
    path = os.path.join(directory, MANIFEST)
    try:
        with open(path, "rb") as f:
            data = json.loads(f.read().decode("utf-8"))
    except FileNotFoundError:
        return empty_manifest()
    except (OSError, ValueError) as e:
        why = e.strerror if isinstance(e, OSError) else f"not valid JSON ({e})"
        raise HpcimageError(f"cannot read the manifest {path}: {why}") from None
    if not isinstance(data, dict) or not isinstance(data.get("images"), dict):
        raise HpcimageError(f"{path}: not an hpcimage manifest")
    return data


def write_json_atomic(path, data, mode=0o644):
    """Temporary name in the same directory, fsync, rename; then fsync the directory."""
    d, name = os.path.split(path)
    tmp = os.path.join(d, f".{name}{TMP_MARK}{os.getpid()}")
    text = json.dumps(data, indent=2, sort_keys=True) + "\n"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC,
                     mode)
        try:
            os.fchmod(fd, mode)
            _write_all(fd, memoryview(text.encode("utf-8")))
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except OSError as e:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise HpcimageError(f"cannot write {path}: {e.strerror}") from None
    _fsync_dir(d)


# --------------------------------------------------------------------------
# What an image says about itself (for the manifest)
# --------------------------------------------------------------------------

def image_facts(path, definition=None):
    """{"build_date", "definition_sha256"} of the image at `path`.

    build_date: when the image file was made, ISO 8601 UTC ("2024-11-27T09:12:00Z"):
    the SIF header's creation time, else the SquashFS superblock's (mksquashfs's time);
    None when the file records none. (The org.label-schema.build-date label is free
    text -- Apptainer writes "Friday_14_June_2019_16:49:57_PDT", local time and a zone
    abbreviation -- and stays in the image as it is.) definition_sha256: of
    `definition` when given, else of the image's /.singularity.d/Singularity, else None."""
    from hpcimage.image import open_image
    image = open_image(path, check_arch=False)   # publish any architecture
    deffile = None
    try:
        from hpcimage.image.tree import Reader
        deffile = Reader(image).cat(".singularity.d/Singularity")
    except (OSError, HpcimageError):
        pass
    created = 0
    try:
        if image.kind == "sif":
            from hpcimage.image import sif
            created = sif.SifImage.open(path).header.created_at
        if created <= 0 and image.kind in ("sif", "squashfs"):   # Go's zero time is < 0
            with open(path, "rb") as f:
                f.seek(image.offset + 8)
                created = int.from_bytes(f.read(4), "little")
    except (OSError, ValueError, HpcimageError):
        created = 0
    build_date = _now_iso(created) if created > 0 else None
    if definition is not None:
        try:
            with open(definition, "rb") as f:
                deffile = f.read()
        except OSError as e:
            raise UsageError(f"--definition {definition}: cannot read: {e.strerror}") from None
    return {"build_date": build_date,
            "definition_sha256": hashlib.sha256(deffile).hexdigest() if deffile else None}


# --------------------------------------------------------------------------
# hpcimage publish
# --------------------------------------------------------------------------

def _find_image(site, name, version):
    for img in site.images:
        if img.name == name and img.version == version:
            return img
    listed = ", ".join(i.module for i in site.images) or "none"
    raise UsageError(f"{name}/{version} is not in {site.path} (its images: {listed}): "
                     "add it there (name, version, file) before publishing")


def _same_file(a, b):
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def _identity_matches(st, entry):
    return (entry is not None and st.st_size == entry.get("size")
            and st.st_mtime_ns == entry.get("mtime_ns"))


def publish(site_path, source, name, version, definition=None, out=None):
    """`hpcimage publish SOURCE --name N --version V`; returns 0."""
    from hpcimage.config import site as sitemod
    from hpcimage.image import sniff
    out = out or sys.stdout
    site = sitemod.load(site_path)
    img = _find_image(site, name, version)
    dest = img.path
    directory, fname = os.path.split(dest)
    source = os.path.abspath(source)
    try:
        st_src = os.stat(source)
        kind = sniff(source)
    except FileNotFoundError:
        raise UsageError(f"{source}: no such file") from None
    except IsADirectoryError:
        kind = "sandbox"
    except OSError as e:
        raise UsageError(f"{source}: cannot read: {e.strerror}") from None
    if kind == "sandbox" or stat.S_ISDIR(st_src.st_mode):
        raise UsageError(f"{source} is a directory: publish takes an image file "
                         "(SquashFS or SIF; 'hpcimage build' makes one)")
    if kind is None or not stat.S_ISREG(st_src.st_mode):
        raise UsageError(f"{source}: not an image (neither a SquashFS nor a SIF file)")
    facts = image_facts(source, definition)
    _makedirs(directory)
    with Lock(os.path.join(directory, STORE_LOCK),
              wait_message=f"publish: waiting for another publish in {directory}") as lock:
        clean_temps(directory, all_stale=lock.locked)
        manifest = load_manifest(directory)
        rec = manifest["images"].get(fname)
        rec = rec if isinstance(rec, dict) else {}
        cur = rec.get("current") if isinstance(rec.get("current"), dict) else None
        previous = [e for e in rec.get("previous", []) if isinstance(e, dict)]
        try:
            st_dest = os.lstat(dest)
        except FileNotFoundError:
            st_dest = None
        except OSError as e:
            raise HpcimageError(f"cannot stat {dest}: {e.strerror}") from None
        if st_dest is not None and not stat.S_ISREG(st_dest.st_mode):
            raise HpcimageError(f"{dest} exists and is not a regular file: move it away")

        adopt = st_dest is not None and _same_file(source, dest)
        tmp = None
        try:
            if adopt:
                # The image was built in place: record it as it is.
                sha = hash_file(dest)
                os.chmod(dest, 0o644)
                st_new = os.stat(dest)
            else:
                tmp = os.path.join(directory, f".{fname}{TMP_MARK}{os.getpid()}")
                src_fd = os.open(source, os.O_RDONLY | os.O_CLOEXEC)
                try:
                    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
                    try:
                        os.fchmod(fd, 0o644)
                        progress = Progress(f"publish {name}/{version}", st_src.st_size)
                        try:
                            sha = copy_hashing(src_fd, fd, st_src.st_size, progress)
                            progress.close(st_src.st_size)
                        finally:
                            progress.close()
                        os.fsync(fd)
                        st_new = os.fstat(fd)
                    finally:
                        os.close(fd)
                finally:
                    os.close(src_fd)
            if (cur is not None and cur.get("sha256") == sha and st_dest is not None
                    and _identity_matches(os.stat(dest), cur)):
                if tmp:
                    os.unlink(tmp)
                    tmp = None
                out.write(f"publish: {name}/{version} is already {dest} "
                          f"(sha256 {sha}); nothing changed\n")
                return 0
            entry = {"sha256": sha, "size": st_new.st_size, "mtime_ns": st_new.st_mtime_ns,
                     "published": _now_iso(), "source": source, "file": fname, **facts}
            # The image being replaced becomes a previous version.
            old = None
            if st_dest is not None and not adopt:
                if _identity_matches(st_dest, cur):
                    old = dict(cur)
                else:    # placed by hand, or changed since it was published
                    old = {"sha256": hash_file(dest), "size": st_dest.st_size,
                           "mtime_ns": st_dest.st_mtime_ns, "published": None,
                           "source": None, "file": fname, "build_date": None,
                           "definition_sha256": None}
                if old["sha256"] == sha:
                    old = None
            keep = site.keep
            if old is not None and keep > 0:
                prev_dir = os.path.join(directory, PREVIOUS)
                _makedirs(prev_dir)
                rel = f"{PREVIOUS}/{old['sha256'][:16]}-{fname}"
                target = os.path.join(directory, rel)
                if not os.path.exists(target):
                    try:
                        os.link(dest, target)
                    except OSError:      # no hard links here: a copy, renamed into place
                        import shutil
                        part = os.path.join(prev_dir, f".{fname}{TMP_MARK}{os.getpid()}")
                        try:
                            shutil.copy2(dest, part)
                            os.replace(part, target)
                        finally:
                            if os.path.exists(part):
                                os.unlink(part)
                old["file"] = rel
                previous.insert(0, old)
            if not adopt:
                os.replace(tmp, dest)
                tmp = None
                _fsync_dir(directory)
        except OSError as e:
            what = e.filename or dest
            if e.errno in (errno.ENOSPC, errno.EDQUOT):
                raise HpcimageError(f"no space left in {directory} for {name}/{version} "
                                    f"({_mib(st_src.st_size)}): nothing was changed") from None
            raise HpcimageError(f"cannot publish {source} to {dest}: {what}: "
                                f"{e.strerror}") from None
        finally:
            if tmp is not None:
                try:
                    os.unlink(tmp)
                except OSError:
                    pass
        # Previous versions: newest first, no duplicates, not the current one.
        seen = {sha}
        kept, dropped = [], []
        for e in previous:
            s = e.get("sha256")
            if s in seen or len(kept) >= site.keep:
                dropped.append(e)
            else:
                kept.append(e)
            seen.add(s)
        manifest["images"][fname] = {"module": img.module, "current": entry, "previous": kept}
        manifest["_comment"] = HEADER
        manifest["version"] = MANIFEST_VERSION
        write_json_atomic(os.path.join(directory, MANIFEST), manifest)
        keep_files = {e.get("file") for e in kept}
        for e in dropped:
            rel = e.get("file") or ""
            if rel.startswith(PREVIOUS + "/") and "/.." not in rel and rel not in keep_files:
                try:
                    os.unlink(os.path.join(directory, rel))
                except OSError:
                    pass
    out.write(f"publish: {name}/{version} -> {dest} ({_mib(entry['size'])}, "
              f"sha256 {sha}); {len(kept)} previous version(s) kept\n")
    return 0


# --------------------------------------------------------------------------
# image-update
# --------------------------------------------------------------------------

class Update:
    """What image-update works on: the module's image and its local copy."""

    def __init__(self, environ):
        from hpcimage.config.policy import load_site
        self.environ = environ
        self.image = environ.get("HPCIMAGE_IMAGE") or ""
        if not self.image:
            raise UsageError("no image module loaded: run 'module load <Name/version>' "
                             "first ('module avail' lists the images)")
        self.image = os.path.abspath(self.image)
        self.module = environ.get("HPCIMAGE_MODULE") or os.path.basename(self.image)
        site = load_site(environ)
        raw = environ.get("HPCIMAGE_LOCAL") or site.get("local") or local.DEFAULT_LOCAL
        self.directory = local.expand(raw, environ) if isinstance(raw, str) else None
        if self.directory is None:
            src = "HPCIMAGE_LOCAL" if environ.get("HPCIMAGE_LOCAL") else "the site's 'local'"
            raise UsageError(f"the local image directory {raw!r} ({src}) is not an absolute "
                             "path once ~ and $VARIABLES are expanded (is a variable unset?)")
        self.copy, self.state_path, self.lock_path, self.tmp_prefix = \
            local.paths(self.image, self.directory)
        self.name = os.path.basename(self.copy)
        if os.path.realpath(self.directory) == os.path.realpath(os.path.dirname(self.image)):
            raise UsageError(f"the local image directory {self.directory} is the store's "
                             "directory: choose another one (HPCIMAGE_LOCAL)")

    # ---- reading

    def local_state(self):
        """(stat, state) of a complete local copy, or (stat or None, None)."""
        try:
            st = os.lstat(self.copy)
        except FileNotFoundError:
            return None, None
        except OSError as e:
            raise HpcimageError(f"cannot stat {self.copy}: {e.strerror}") from None
        state = local.read_state(self.state_path)
        if state is None or not local.matches(st, state):
            return st, None
        return st, state

    def entry(self, status=1):
        """The manifest's current entry for the image; HpcimageError(status) if none."""
        try:
            manifest = local.read_manifest(self.image)
        except local.Unreachable as e:
            msg = (f"the image store is unreachable: cannot read {e.path}: {e.strerror}")
            _, state = self.local_state_quiet()
            if state is not None:
                msg += f"; the local copy {self.copy} stays in use"
            raise HpcimageError(msg, status) from None
        except ValueError as e:
            raise HpcimageError(f"{local.manifest_path(self.image)}: unreadable manifest: {e}",
                                status) from None
        entry = local.current_entry(manifest, self.image)
        if entry is None:
            raise HpcimageError(
                f"{self.image} is not in the store's manifest "
                f"({local.manifest_path(self.image)}): the administrator publishes it with "
                f"'hpcimage publish IMAGE --name NAME --version VERSION'", status)
        return entry

    def local_state_quiet(self):
        try:
            return self.local_state()
        except HpcimageError:
            return None, None

    def _refuse_odd_local(self, st):
        if st is None:
            return
        if stat.S_ISLNK(st.st_mode):
            try:
                target = os.readlink(self.copy)
            except OSError:
                target = "?"
            raise HpcimageError(
                f"{self.copy} is a symbolic link (to {target}), not a copy made by "
                "image-update: it is left alone and not written through; remove it, or "
                "set HPCIMAGE_LOCAL to another directory")
        if not stat.S_ISREG(st.st_mode):
            raise HpcimageError(f"{self.copy} is not a regular file: it is left alone; "
                                "move it away, or set HPCIMAGE_LOCAL to another directory")

    # ---- the commands

    def check(self, out):
        """0: the local copy is current; 1: an update exists (or no copy); 2: error."""
        st, state = self.local_state()
        entry = self.entry(status=2)
        if state is not None and state["sha256"] == entry["sha256"]:
            out.write(f"{self.module}: the local copy {self.copy} is current\n")
            return 0
        when = entry.get("published") or "?"
        if st is None:
            out.write(f"{self.module}: no local copy; image-update makes one "
                      f"({_mib(entry.get('size', 0))}, published {when})\n")
        else:
            out.write(f"{self.module}: an update is available (published {when}, "
                      f"sha256 {entry['sha256'][:16]}...); run image-update\n")
        return 1

    def remove(self, out):
        if not os.path.isdir(self.directory):
            out.write(f"{self.module}: no local copy in {self.directory}\n")
            return 0
        with Lock(self.lock_path, create_mode=0o600,
                  wait_message=f"image-update: waiting for another image-update of {self.name}",
                  prog="image-update") as lock:
            clean_temps(self.directory, self.name, all_stale=lock.locked)
            try:
                st = os.lstat(self.copy)
            except FileNotFoundError:
                st = None
            self._refuse_odd_local(st)
            for p in (self.state_path, self.copy):
                try:
                    os.unlink(p)
                except FileNotFoundError:
                    pass
                except OSError as e:
                    raise HpcimageError(f"cannot remove {p}: {e.strerror}") from None
        if st is None:
            out.write(f"{self.module}: no local copy in {self.directory}\n")
        else:
            out.write(f"{self.module}: removed the local copy {self.copy}; the image-* "
                      f"commands use {self.image}\n")
        return 0

    def update(self, out, err):
        _makedirs(self.directory)
        if not os.access(self.directory, os.W_OK | os.X_OK):
            raise HpcimageError(f"cannot write to the local image directory {self.directory}: "
                                "permission denied (set HPCIMAGE_LOCAL to another one)")
        with Lock(self.lock_path, create_mode=0o600,
                  wait_message=f"image-update: waiting for another image-update of {self.name}",
                  err=err, prog="image-update") as lock:
            clean_temps(self.directory, self.name, all_stale=lock.locked)
            st, state = self.local_state()
            self._refuse_odd_local(st)
            entry = self.entry()
            if state is not None and state["sha256"] == entry["sha256"]:
                out.write(f"{self.module}: the local copy {self.copy} is up to date "
                          f"(published {entry.get('published') or '?'})\n")
                return 0
            return self._copy(entry, out, err)

    def _open_source(self, entry):
        """Open the store's file and make sure it is the one `entry` describes (a
        publish may be between its two renames: wait it out)."""
        deadline = time.monotonic() + MANIFEST_WAIT
        while True:
            try:
                fd = os.open(self.image, os.O_RDONLY | os.O_CLOEXEC)
            except OSError as e:
                raise HpcimageError(f"cannot read {self.image}: {e.strerror}") from None
            st = os.fstat(fd)
            if _identity_matches(st, entry):
                return fd, st, entry
            os.close(fd)
            if time.monotonic() > deadline:
                raise HpcimageError(
                    f"{self.image} is not the file its manifest describes (size or mtime "
                    "differ: changed after it was published); the local copy is unchanged; "
                    "tell the administrator (hpcimage publish records it again)")
            time.sleep(0.2)
            entry = self.entry()

    def _copy(self, entry, out, err):
        src, st_src, entry = self._open_source(entry)
        tmp = f"{self.tmp_prefix}{os.getpid()}"
        state_tmp = None
        size = st_src.st_size
        try:
            vfs = os.statvfs(self.directory)
            free = vfs.f_bavail * vfs.f_frsize
            if free < size:
                raise HpcimageError(
                    f"not enough space in {self.directory} for {self.name}: "
                    f"{_mib(size)} needed, {_mib(free)} free; the local copy is unchanged")
            try:
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                             | os.O_CLOEXEC, 0o644)
            except OSError as e:
                raise HpcimageError(f"cannot create {tmp}: {e.strerror}") from None
            t0 = time.monotonic()
            progress = Progress(f"image-update {self.module}", size, stream=err)
            try:
                sha = copy_hashing(src, fd, size, progress)
                progress.close(size)
                if sha != entry["sha256"]:
                    raise HpcimageError(
                        f"{self.image}: sha256 mismatch: the store's file is corrupt "
                        f"(manifest {entry['sha256'][:16]}..., file {sha[:16]}...); the local "
                        "copy is unchanged; tell the administrator")
                os.fsync(fd)
                st = os.fstat(fd)
            finally:
                progress.close()
                os.close(fd)
            state_tmp = f"{self.tmp_prefix}{os.getpid()}.state"
            os.symlink(local.format_state(sha, st, self.image), state_tmp)
            # The copy first, then its record: between the two, the old record does
            # not match the new file, so the wrappers use the store.
            os.replace(tmp, self.copy)
            tmp = None
            os.replace(state_tmp, self.state_path)
            state_tmp = None
            _fsync_dir(self.directory)
            secs = time.monotonic() - t0
        except OSError as e:
            if e.errno in (errno.ENOSPC, errno.EDQUOT):
                raise HpcimageError(
                    f"no space left in {self.directory} while copying {self.name} "
                    f"({_mib(size)}): the local copy is unchanged") from None
            raise HpcimageError(f"cannot update {self.copy}: {e.strerror}") from None
        finally:
            os.close(src)
            for p in (tmp, state_tmp):
                if p is not None:
                    try:
                        os.unlink(p)
                    except OSError:
                        pass
        out.write(f"{self.module}: updated the local copy {self.copy} ({_mib(size)} in "
                  f"{secs:.1f} s, sha256 verified)\n")
        return 0


def update(environ=None, check=False, remove=False, out=None, err=None):
    """`image-update [--check | --remove]`; returns the exit status."""
    environ = os.environ if environ is None else environ
    out = out or sys.stdout
    err = err or sys.stderr
    u = Update(environ)
    if check:
        try:
            return u.check(out)
        except HpcimageError as e:
            e.status = 2            # --check: 0 current, 1 update available, 2 error
            raise
    if remove:
        return u.remove(out)
    return u.update(out, err)
