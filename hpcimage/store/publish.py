"""hpcimage publish: an image into the store, with its manifest entry (docs/store.md)."""
import errno
import os
import stat
import sys

from hpcimage.fsutil import AtomicFile
from hpcimage.errors import HpcimageError, UsageError
from hpcimage.store.layout import identity_matches, MANIFEST, STORE_LOCK, PREVIOUS, TMP_MARK, now_iso, makedirs, clean_temps, Lock
from hpcimage.store.transfer import Progress, copy_hashing, hash_file, mib
from hpcimage.store.manifest import MANIFEST_VERSION, HEADER, load_manifest, write_json_atomic, image_facts


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


def publish(site_path, source, name, version, definition=None, out=None, sign=False):
    """`hpcimage publish SOURCE --name N --version V [--sign]`; returns 0.
    sign: a copy of SOURCE signed with the site's key (site.yaml signing.sign_key) is
    published. With a signature policy (site.yaml signing:, or an image's verify:), the
    image is verified with the site's keys and the result recorded in its manifest
    entry ("signature"), where the wrappers read it (docs/signing.md)."""
    if sign:
        import shutil
        import tempfile
        from hpcimage.config import site as sitemod
        from hpcimage.signing import trust
        site = sitemod.load(site_path)
        directory = os.path.dirname(_find_image(site, name, version).path)
        makedirs(directory)
        with tempfile.TemporaryDirectory(dir=directory, prefix=".hpcimage-sign-") as tmp:
            signed = os.path.join(tmp, os.path.basename(source))
            try:
                shutil.copyfile(source, signed)
            except FileNotFoundError:
                raise UsageError(f"{source}: no such file") from None
            except OSError as e:
                raise HpcimageError(f"cannot copy {source} to sign it: {e.strerror}") from None
            trust.sign_with_site_key(signed, site.signing)
            return _publish(site_path, signed, name, version, definition, out,
                            shown=os.path.abspath(source))
    return _publish(site_path, source, name, version, definition, out)


def _publish(site_path, source, name, version, definition=None, out=None, shown=None):
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
    makedirs(directory)
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
        # The new file: at a temporary name (recognised by the store's clean-up) until
        # the decision below; renamed onto dest last (fsutil.AtomicFile, in steps).
        staged = None
        try:
            if adopt:
                # The image was built in place: record it as it is.
                sha = hash_file(dest)
                os.chmod(dest, 0o644)
                st_new = os.stat(dest)
            else:
                staged = AtomicFile(dest, 0o644, exclusive=True,
                                    tmp=os.path.join(directory,
                                                     f".{fname}{TMP_MARK}{os.getpid()}"))
                src_fd = os.open(source, os.O_RDONLY | os.O_CLOEXEC)
                try:
                    f = staged.open()
                    progress = Progress(f"publish {name}/{version}", st_src.st_size)
                    try:
                        sha = copy_hashing(src_fd, f.fileno(), st_src.st_size, progress)
                        progress.close(st_src.st_size)
                    finally:
                        progress.close()
                    staged.sync()
                    st_new = os.fstat(f.fileno())
                finally:
                    os.close(src_fd)
            if (cur is not None and cur.get("sha256") == sha and st_dest is not None
                    and identity_matches(os.stat(dest), cur)):
                if site.signing or img.verify:
                    # The site's keys or trusted signers may have changed: the record too.
                    from hpcimage.signing import trust
                    rec = trust.record(dest, site.signing)
                    if rec != cur.get("signature"):
                        cur["signature"] = rec
                        manifest["_comment"] = HEADER
                        write_json_atomic(os.path.join(directory, MANIFEST), manifest)
                        out.write(f"publish: {name}/{version} is already {dest} "
                                  f"(sha256 {sha}); its signature record is updated "
                                  f"(trusted: {'yes' if rec['verified'] else 'no'})\n")
                        return 0
                out.write(f"publish: {name}/{version} is already {dest} "
                          f"(sha256 {sha}); nothing changed\n")
                return 0
            entry = {"sha256": sha, "size": st_new.st_size,
                     "mtime_ns": st_new.st_mtime_ns,
                     "published": now_iso(), "source": shown or source, "file": fname,
                     **facts}
            if site.signing or img.verify:
                from hpcimage.signing import trust
                entry["signature"] = trust.record(dest if adopt else staged.tmp, site.signing)
                mode = img.verify or site.signing.get("verify") or "off"
                if mode != "off" and not entry["signature"]["verified"]:
                    sys.stderr.write(f"publish: warning: {name}/{version} is not signed by a "
                                     f"key the site trusts ({entry['signature']['reason']}): "
                                     f"its wrappers will {'refuse' if mode == 'require' else 'warn about'} it "
                                     f"(verify: {mode})\n")
            # The image being replaced becomes a previous version.
            old = None
            if st_dest is not None and not adopt:
                if identity_matches(st_dest, cur):
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
                makedirs(prev_dir)
                rel = f"{PREVIOUS}/{old['sha256'][:16]}-{fname}"
                target = os.path.join(directory, rel)
                if not os.path.exists(target):
                    try:
                        os.link(dest, target)
                    except OSError:      # no hard links here: a copy, renamed into place
                        _copy_atomic(dest, target, os.path.join(
                            prev_dir, f".{fname}{TMP_MARK}{os.getpid()}"))
                old["file"] = rel
                previous.insert(0, old)
            if staged is not None:
                staged.commit()
        except OSError as e:
            what = e.filename or dest
            if e.errno in (errno.ENOSPC, errno.EDQUOT):
                raise HpcimageError(f"no space left in {directory} for {name}/{version} "
                                    f"({mib(st_src.st_size)}): nothing was changed") from None
            raise HpcimageError(f"cannot publish {source} to {dest}: {what}: "
                                f"{e.strerror}") from None
        finally:
            if staged is not None:
                staged.discard()
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
    out.write(f"publish: {name}/{version} -> {dest} ({mib(entry['size'])}, "
              f"sha256 {sha}); {len(kept)} previous version(s) kept\n")
    return 0


def _copy_atomic(src, dest, tmp):
    """Copy SRC to DEST (a previous version, where hard links fail) through a temporary
    name: fsutil.AtomicFile; the copy keeps SRC's times, as a hard link would. Errors:
    OSError."""
    with open(src, "rb") as fin, AtomicFile(dest, 0o644, tmp) as fout:
        while True:
            block = fin.read(1 << 20)
            if not block:
                break
            fout.write(block)
        st = os.fstat(fin.fileno())
    os.utime(dest, ns=(st.st_atime_ns, st.st_mtime_ns))
