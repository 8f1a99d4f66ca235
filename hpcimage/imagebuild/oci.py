"""OCI and Docker images -> a root tree with /.singularity.d, as Apptainer converts them.

Sources: a `docker save` tarball (manifest.json + layer tars, or the OCI layout newer
Dockers write), an OCI layout directory or tarball (index.json, blobs/sha256/...), and
a registry (hpcimage.imagebuild.registry hands over downloaded, verified blobs).

Layers are applied in order (each a tar, plain, gzip, bzip2, xz, or zstd through the
`zstd` program); `.wh.NAME` removes NAME from the lower layers, `.wh..wh..opq` empties
its directory of what lower layers put there (the OCI image spec's whiteouts). Paths
are resolved inside the tree (a symlink in a layer never leads a later file out of
it); owners are set where the namespace maps them, device nodes are skipped.

The image config's Env goes to /.singularity.d/env/10-docker2singularity.sh, Entrypoint
and Cmd make /.singularity.d/runscript (arguments replace Cmd, as `docker run` does),
WorkingDir is recorded there as OCI_WORKDIR (the working directory stays the caller's,
as with Apptainer), Labels go to labels.json.
"""
import hashlib
import io
import json
import os
import shutil
import stat
import subprocess
import tarfile

from hpcimage.errors import HpcimageError, UsageError
from hpcimage.linux.paths import resolve_in

INDEX_TYPES = ("application/vnd.oci.image.index.v1+json",
               "application/vnd.docker.distribution.manifest.list.v2+json")
MANIFEST_TYPES = ("application/vnd.oci.image.manifest.v1+json",
                  "application/vnd.docker.distribution.manifest.v2+json")
REF_ANNOTATION = "org.opencontainers.image.ref.name"
WHITEOUT = ".wh."
OPAQUE = ".wh..wh..opq"


class Image:
    """An image ready to unpack: its config (dict) and its layers, each a callable
    returning a readable binary file object."""

    def __init__(self, config, layers, where, close=None):
        self.config, self.layers, self.where, self._close = config, layers, where, close

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self._close:
            self._close()
        return False

    def unpack(self, root):
        for i, opener in enumerate(self.layers):
            with opener() as f:
                apply_layer(f, root, f"{self.where}: layer {i + 1}")
                while f.read(1 << 20):      # to the end: a registry blob's digest is
                    pass                    # checked when it has been read whole
        write_metadata(self.config, root)


# ----------------------------------------------------------------- the sources

def _json(data, what):
    try:
        v = json.loads(data)
    except ValueError as e:
        raise HpcimageError(f"{what}: not valid JSON: {e}") from None
    return v


def _tar_reader(path, where):
    try:
        return tarfile.open(path, "r:*")
    except (tarfile.TarError, OSError) as e:
        raise UsageError(f"{where}: {path}: not a readable tar archive: {e}") from None


def _members(tf):
    return {m.name[2:] if m.name.startswith("./") else m.name.lstrip("/"): m
            for m in tf.getmembers()}


def open_docker_archive(path, where):
    """`docker save` output: manifest.json (first image) or, failing that, OCI layout."""
    tf = _tar_reader(path, where)
    try:
        members = _members(tf)
        if "manifest.json" not in members:
            if "index.json" in members:
                return _open_layout(_TarBlobs(tf, members), None, where, tf.close)
            raise UsageError(f"{where}: {path}: no manifest.json: not a `docker save` archive")
        man = _json(tf.extractfile(members["manifest.json"]).read(), f"{path}: manifest.json")
        if not isinstance(man, list) or not man or not isinstance(man[0], dict):
            raise HpcimageError(f"{where}: {path}: manifest.json lists no image")
        entry = man[0]
        cfg_name = entry.get("Config", "")
        if cfg_name not in members:
            raise HpcimageError(f"{where}: {path}: config {cfg_name!r} missing")
        config = _json(tf.extractfile(members[cfg_name]).read(), f"{path}: {cfg_name}")
        layers = []
        for name in entry.get("Layers") or []:
            if name not in members:
                raise HpcimageError(f"{where}: {path}: layer {name!r} missing")
            layers.append(lambda m=members[name]: tf.extractfile(m))
        return Image(config, layers, where, tf.close)
    except BaseException:
        tf.close()
        raise


class _TarBlobs:
    def __init__(self, tf, members):
        self.tf, self.members = tf, members

    def read(self, name):
        m = self.members.get(name)
        if m is None:
            raise KeyError(name)
        return self.tf.extractfile(m).read()

    def open(self, name):
        m = self.members.get(name)
        if m is None:
            raise KeyError(name)
        return self.tf.extractfile(m)


class _DirBlobs:
    def __init__(self, root):
        self.root = root

    def read(self, name):
        with self.open(name) as f:
            return f.read()

    def open(self, name):
        try:
            return open(os.path.join(self.root, name), "rb")
        except FileNotFoundError:
            raise KeyError(name) from None


def open_oci_archive(path, ref, where):
    tf = _tar_reader(path, where)
    try:
        return _open_layout(_TarBlobs(tf, _members(tf)), ref, where, tf.close)
    except BaseException:
        tf.close()
        raise


def open_oci_layout(path, ref, where):
    if not os.path.isdir(path):
        raise UsageError(f"{where}: {path}: not an OCI layout directory")
    return _open_layout(_DirBlobs(path), ref, where)


def _blob_name(digest, where):
    algo, _, hexd = (digest or "").partition(":")
    if algo not in ("sha256", "sha512") or not hexd or not all(c in "0123456789abcdef" for c in hexd):
        raise HpcimageError(f"{where}: bad digest {digest!r}")
    return f"blobs/{algo}/{hexd}"


def _verified(data, digest, where):
    algo, _, hexd = digest.partition(":")
    if hashlib.new(algo, data).hexdigest() != hexd:
        raise HpcimageError(f"{where}: digest mismatch for {digest}")
    return data


def _open_layout(blobs, ref, where, close=None):
    try:
        index = _json(blobs.read("index.json"), f"{where}: index.json")
    except KeyError:
        raise UsageError(f"{where}: no index.json: not an OCI image layout") from None
    descs = index.get("manifests") or []
    if ref:
        descs = [d for d in descs if (d.get("annotations") or {}).get(REF_ANNOTATION) == ref]
        if not descs:
            raise UsageError(f"{where}: no image tagged {ref!r} in the OCI layout")
    if not descs:
        raise HpcimageError(f"{where}: the OCI layout lists no image")

    def get(desc):
        name = _blob_name(desc.get("digest"), where)
        try:
            return _verified(blobs.read(name), desc["digest"], where)
        except KeyError:
            raise HpcimageError(f"{where}: blob {desc['digest']} missing") from None

    desc = select_platform(descs, where) if len(descs) > 1 else descs[0]
    for _ in range(4):
        if desc.get("mediaType") in INDEX_TYPES:
            sub = _json(get(desc), f"{where}: index")
            desc = select_platform(sub.get("manifests") or [], where)
            continue
        break
    manifest = _json(get(desc), f"{where}: manifest")
    if manifest.get("mediaType") in INDEX_TYPES or "manifests" in manifest:
        desc = select_platform(manifest.get("manifests") or [], where)
        manifest = _json(get(desc), f"{where}: manifest")
    config = _json(get(manifest.get("config") or {}), f"{where}: config")
    layers = []
    for ld in manifest.get("layers") or []:
        name = _blob_name(ld.get("digest"), where)

        def opener(name=name, digest=ld["digest"]):
            try:
                return _HashingReader(blobs.open(name), digest, where)
            except KeyError:
                raise HpcimageError(f"{where}: layer blob {digest} missing") from None
        layers.append(opener)
    return Image(config, layers, where, close)


class _HashingReader(io.RawIOBase):
    """Reads through a file, checking its digest when it has been read to the end."""

    def __init__(self, f, digest, where):
        self.f, self.digest, self.where = f, digest, where
        algo, _, self.hex = digest.partition(":")
        self.h = hashlib.new(algo)
        self.done = False

    def readable(self):
        return True

    def readinto(self, b):
        data = self.f.read(len(b))
        if not data:
            if not self.done:
                self.done = True
                if self.h.hexdigest() != self.hex:
                    raise HpcimageError(f"{self.where}: digest mismatch for {self.digest}")
            return 0
        self.h.update(data)
        b[:len(data)] = data
        return len(data)

    def close(self):
        try:
            self.f.close()
        finally:
            super().close()


def host_platform():
    from hpcimage.image.sif import host_goarch
    arch = host_goarch()
    variant = {"arm64": "v8", "arm": "v7"}.get(arch)
    return "linux", arch, variant


def select_platform(descs, where, arch=None):
    """The manifest of a list that runs here (linux/<host arch>[/variant]), or, with arch
    (pull --arch), the one for linux/ARCH (its platform must name that architecture).
    Errors: HpcimageError naming the platforms the list has."""
    os_, here, variant = host_platform()
    explicit = arch is not None
    if explicit:
        variant = None
    else:
        arch = here
    cands = [d for d in descs if (d.get("platform") or {}).get("os", "linux") == os_
             and (d.get("platform") or {}).get("architecture", None if explicit else arch)
             == arch]
    if len(cands) > 1 and variant:
        exact = [d for d in cands if (d.get("platform") or {}).get("variant") in (variant, None)]
        cands = exact or cands
    if not cands:
        have = ", ".join(sorted({f"{(d.get('platform') or {}).get('os')}/"
                                 f"{(d.get('platform') or {}).get('architecture')}"
                                 for d in descs})) or "none"
        raise HpcimageError(f"{where}: no image for {os_}/{arch} (the image has: {have})")
    return cands[0]


# ----------------------------------------------------------------- the layers

def _norm(name):
    parts = []
    for c in name.split("/"):
        if c in ("", "."):
            continue
        if c == "..":
            return None
        parts.append(c)
    return "/".join(parts)


def _remove(path):
    if os.path.isdir(path) and not os.path.islink(path):
        from hpcimage.imagebuild.layout import remove_tree
        remove_tree(path)
    else:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass


def _open_layer(f, where):
    head = f.read(4) if hasattr(f, "read") else b""
    rest = _Prefixed(head, f)
    if head == b"\x28\xb5\x2f\xfd":
        if shutil.which("zstd") is None:
            raise HpcimageError(f"{where}: zstd-compressed layer: install zstd")
        p = subprocess.Popen(["zstd", "-dc"], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        import threading

        def feed():
            try:
                while True:
                    b = rest.read(1 << 20)
                    if not b:
                        break
                    p.stdin.write(b)
            except (BrokenPipeError, OSError):
                pass
            finally:
                try:
                    p.stdin.close()
                except OSError:
                    pass
        t = threading.Thread(target=feed, daemon=True)
        t.start()
        return tarfile.open(fileobj=p.stdout, mode="r|"), (p, t)
    return tarfile.open(fileobj=rest, mode="r|*"), None


class _Prefixed(io.RawIOBase):
    def __init__(self, head, f):
        self.head, self.f = head, f

    def readable(self):
        return True

    def readinto(self, b):
        if self.head:
            n = min(len(b), len(self.head))
            b[:n] = self.head[:n]
            self.head = self.head[n:]
            return n
        data = self.f.read(len(b))
        b[:len(data)] = data
        return len(data)

    def read(self, n=-1):
        if n is None or n < 0:
            data = self.head + self.f.read()
            self.head = b""
            return data
        return super().read(n)


def apply_layer(f, root, where):
    """Apply one layer (a tar stream) on top of ROOT, whiteouts included."""
    try:
        tf, proc = _open_layer(f, where)
    except tarfile.TarError as e:
        raise HpcimageError(f"{where}: not a tar layer: {e}") from None
    created = set()
    dirs = []
    try:
        for m in tf:
            rel = _norm(m.name)
            if rel is None:
                raise HpcimageError(f"{where}: {m.name!r}: a path with '..' in a layer")
            if not rel:
                continue
            parent_rel, _, base = rel.rpartition("/")
            pr = resolve_in(root, "/" + parent_rel) if parent_rel else ""
            parent = os.path.join(root, pr)
            if base.startswith(WHITEOUT):
                if not os.path.isdir(parent):
                    continue
                if base == OPAQUE:
                    for name in os.listdir(parent):
                        r = f"{pr}/{name}" if pr else name
                        if r not in created:
                            _remove(os.path.join(parent, name))
                else:
                    _remove(os.path.join(parent, base[len(WHITEOUT):]))
                continue
            if not os.path.isdir(parent):
                if os.path.lexists(parent):
                    _remove(parent)
                os.makedirs(parent, exist_ok=True)
            target = os.path.join(parent, base)
            r = f"{pr}/{base}" if pr else base
            exists = os.path.lexists(target)
            if exists and not (m.isdir() and os.path.isdir(target) and not os.path.islink(target)):
                _remove(target)
            if m.isdir():
                if not os.path.isdir(target):
                    os.mkdir(target, 0o700)
                dirs.append((target, m))
            elif m.isreg():
                src = tf.extractfile(m)
                fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
                with os.fdopen(fd, "wb") as out:
                    shutil.copyfileobj(src, out, 1 << 20)
            elif m.issym():
                os.symlink(m.linkname, target)
            elif m.islnk():
                lr = _norm(m.linkname)
                src = os.path.join(root, resolve_in(root, "/" + lr)) if lr else None
                if not src or not os.path.lexists(src):
                    raise HpcimageError(f"{where}: {m.name}: hard link to missing {m.linkname}")
                os.link(src, target, follow_symlinks=False)
                created.add(r)
                continue
            elif m.isfifo():
                os.mkfifo(target)
            elif m.ischr() or m.isblk():
                try:
                    os.mknod(target, (stat.S_IFCHR if m.ischr() else stat.S_IFBLK) | 0o600,
                             os.makedev(m.devmajor, m.devminor))
                except OSError:
                    continue        # no device nodes in a user namespace: /dev is bound
            else:
                continue
            created.add(r)
            try:
                os.lchown(target, m.uid, m.gid)
            except OSError:
                pass
            if not m.issym():
                os.chmod(target, m.mode & 0o7777)
                if not m.isdir():
                    os.utime(target, (m.mtime, m.mtime))
    except tarfile.TarError as e:
        raise HpcimageError(f"{where}: broken layer: {e}") from None
    finally:
        tf.close()
        if proc:
            p, t = proc
            p.stdout.close()
            p.wait()
    for target, m in reversed(dirs):
        os.chmod(target, m.mode & 0o7777)
        os.utime(target, (m.mtime, m.mtime))


# ----------------------------------------------------------------- the metadata

def _sq(s):
    return "'" + str(s).replace("'", "'\\''") + "'"


def _dq(s):
    return "".join("\\" + c if c in '\\"$`' else c for c in str(s))


def _words(v):
    if v is None:
        return []
    if isinstance(v, str):
        return ["/bin/sh", "-c", v]
    return [str(x) for x in v]


def write_metadata(config, root):
    from hpcimage.imagebuild.layout import base_layout, read_json, write_file
    from hpcimage.runtime.options import valid_name
    base_layout(root)
    cfg = config.get("config") or config.get("Config") or {}
    meta = os.path.join(root, ".singularity.d")
    lines = ["#!/bin/sh", "# The image config's Env (hpcimage build, as Apptainer's "
             "docker2singularity)."]
    for item in cfg.get("Env") or []:
        k, eq, v = str(item).partition("=")
        if not eq or not valid_name(k):
            continue
        if k == "PATH":
            lines.append(f"export PATH={_sq(v)}")
        else:
            lines.append(f'export {k}="${{{k}:-"{_dq(v)}"}}"')
    write_file(os.path.join(meta, "env/10-docker2singularity.sh"), "\n".join(lines) + "\n", 0o755)
    ep, cmd = _words(cfg.get("Entrypoint")), _words(cfg.get("Cmd"))
    e, c = " ".join(_sq(w) for w in ep), " ".join(_sq(w) for w in cmd)
    wd = cfg.get("WorkingDir") or ""
    text = ["#!/bin/sh", "# From the OCI image config: ENTRYPOINT and CMD as `docker run` "
            "uses them (arguments replace CMD).",
            f"OCI_ENTRYPOINT={_sq(e)}", f"OCI_CMD={_sq(c)}",
            f"OCI_WORKDIR={_sq(wd)}     # not entered: the working directory stays the caller's"]
    if ep and cmd:
        text.append(f'if [ $# -gt 0 ]; then exec {e} "$@"; else exec {e} {c}; fi')
    elif ep:
        text.append(f'exec {e} "$@"')
    elif cmd:
        text.append(f'if [ $# -gt 0 ]; then exec "$@"; else exec {c}; fi')
    else:
        text.append('if [ $# -gt 0 ]; then exec "$@"; else exec /bin/sh; fi')
    write_file(os.path.join(meta, "runscript"), "\n".join(text) + "\n", 0o755)
    labels = read_json(os.path.join(meta, "labels.json"))
    for k, v in (cfg.get("Labels") or {}).items():
        labels[str(k)] = str(v)
    write_file(os.path.join(meta, "labels.json"), json.dumps(labels, indent=1, sort_keys=True) + "\n")
