"""image-update: the user's local copy from the central store (docs/store.md)."""
import errno
import os
import stat
import sys
import time

from hpcimage.fsutil import AtomicFile, fsync_dir
from hpcimage.errors import HpcimageError, UsageError
from hpcimage.runtime import localcopy as local
from hpcimage.store.layout import identity_matches, makedirs, clean_temps, Lock
from hpcimage.store.transfer import Progress, copy_hashing, mib


MANIFEST_WAIT = 2.0                # seconds image-update waits out a publish in progress


class Update:
    """What image-update works on: the module's image and its local copy."""

    def __init__(self, environ):
        from hpcimage.config.policy import load_policy
        self.environ = environ
        self.image = environ.get("HPCIMAGE_IMAGE") or ""
        if not self.image:
            raise UsageError("no image module loaded: run 'module load <Name/version>' "
                             "first ('module avail' lists the images)")
        self.image = os.path.abspath(self.image)
        self.module = environ.get("HPCIMAGE_MODULE") or os.path.basename(self.image)
        site = load_policy(environ)
        self.site = site
        raw = environ.get("HPCIMAGE_LOCAL") or site.local or local.DEFAULT_LOCAL
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
                      f"({mib(entry.get('size', 0))}, published {when})\n")
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
        makedirs(self.directory)
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
            if identity_matches(st, entry):
                return fd, st, entry
            os.close(fd)
            if time.monotonic() > deadline:
                raise HpcimageError(
                    f"{self.image} is not the file its manifest describes (size or mtime "
                    "differ: changed after it was published); the local copy is unchanged; "
                    "tell the administrator (hpcimage publish records it again)")
            time.sleep(0.2)
            entry = self.entry()

    def _check_signature(self, path, sha, err):
        """The site's signature policy (docs/signing.md) on the staged copy: None when off;
        else the trust record to write. Under require an untrusted copy is not installed."""
        mode = local.verify_mode(self.site, self.module)
        if mode == "off":
            return None
        from hpcimage.signing import trust
        rec = trust.record(path, self.site.signing or {})
        if not rec["verified"]:
            msg = (f"{self.module}: image not signed by a key the site trusts: {rec['reason']} "
                   f"(site policy verify: {mode})")
            if mode == "require":
                raise HpcimageError(msg + "; the local copy is unchanged")
            err.write(f"image-update: warning: {msg}\n")
        return local.format_trust(sha, rec["verified"], rec["reason"])

    def _copy(self, entry, out, err):
        src, st_src, entry = self._open_source(entry)
        # The copy at a temporary name (fsutil.AtomicFile in steps), then its record.
        staged = AtomicFile(self.copy, 0o644, tmp=f"{self.tmp_prefix}{os.getpid()}",
                            exclusive=True)
        state_tmp = None
        size = st_src.st_size
        try:
            vfs = os.statvfs(self.directory)
            free = vfs.f_bavail * vfs.f_frsize
            if free < size:
                raise HpcimageError(
                    f"not enough space in {self.directory} for {self.name}: "
                    f"{mib(size)} needed, {mib(free)} free; the local copy is unchanged")
            try:
                f = staged.open()
            except OSError as e:
                raise HpcimageError(f"cannot create {staged.tmp}: {e.strerror}") from None
            t0 = time.monotonic()
            progress = Progress(f"image-update {self.module}", size, stream=err)
            try:
                sha = copy_hashing(src, f.fileno(), size, progress)
                progress.close(size)
                if sha != entry["sha256"]:
                    raise HpcimageError(
                        f"{self.image}: sha256 mismatch: the store's file is corrupt "
                        f"(manifest {entry['sha256'][:16]}..., file {sha[:16]}...); the local "
                        "copy is unchanged; tell the administrator")
                staged.sync()
                st = os.fstat(f.fileno())
            finally:
                progress.close()
            trust = self._check_signature(staged.tmp, sha, err)
            state_tmp = f"{self.tmp_prefix}{os.getpid()}.state"
            os.symlink(local.format_state(sha, st, self.image), state_tmp)
            if trust is not None:
                # The trust record first: it names the new sha256, which no state
                # names yet, so it says nothing until the state below is renamed.
                trust_tmp = f"{self.tmp_prefix}{os.getpid()}.trust"
                try:
                    os.unlink(trust_tmp)
                except FileNotFoundError:
                    pass
                os.symlink(trust, trust_tmp)
                os.replace(trust_tmp, local.trust_path(self.state_path))
            # The copy first, then its record: between the two, the old record does
            # not match the new file, so the wrappers use the store.
            staged.commit()
            os.replace(state_tmp, self.state_path)
            state_tmp = None
            fsync_dir(self.directory)
            secs = time.monotonic() - t0
        except OSError as e:
            if e.errno in (errno.ENOSPC, errno.EDQUOT):
                raise HpcimageError(
                    f"no space left in {self.directory} while copying {self.name} "
                    f"({mib(size)}): the local copy is unchanged") from None
            raise HpcimageError(f"cannot update {self.copy}: {e.strerror}") from None
        finally:
            os.close(src)
            staged.discard()
            if state_tmp is not None:
                try:
                    os.unlink(state_tmp)
                except OSError:
                    pass
        out.write(f"{self.module}: updated the local copy {self.copy} ({mib(size)} in "
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
