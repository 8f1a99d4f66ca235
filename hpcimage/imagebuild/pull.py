"""`hpcimage pull` and `hpcimage exec|run|shell docker://REF`: registry images -> SIF,
converted once into the cache (as Apptainer's `pull` and its actions on a URI).

    docker://[registry/]repository[:tag|@sha256:...]   an OCI/Docker image: converted
        to SIF by the build (hpcimage.imagebuild.builder, `Bootstrap: docker`), once per
        image manifest, into CACHE/sif/sha256/<manifest digest>.sif
    oras://registry/repository[:tag|@sha256:...]       a SIF pushed as an ORAS artifact
        (a layer of type application/vnd.sylabs.sif.layer.v1.sif): the blob is the SIF

CACHE is hpcimage.imagebuild.registry.cache_dir() (HPCIMAGE_CACHEDIR; else
APPTAINER_CACHEDIR/SINGULARITY_CACHEDIR + /hpcimage; else ~/.cache/hpcimage). Each
reference asks the registry for its manifest's digest (as Apptainer does): a digest
already converted is used as it is. When the registry cannot be reached at all, the
image that reference (and architecture) last resolved to is used, with a warning
(CACHE/refs/: Apptainer fails there instead). A reference by digest needs no registry
once cached. Downloads show a progress line on a terminal and nothing otherwise.
"""
import hashlib
import os
import sys

from hpcimage import fsutil
from hpcimage.errors import HpcimageError, UsageError
from hpcimage.imagebuild import oci, registry

SCHEMES = ("docker", "oras")
REFUSED = {
    "library": "library:// (the Sylabs Cloud library) is not supported by hpcimage: use "
               "docker:// or oras://",
    "shub": "shub:// (Singularity Hub, retired in 2021) is not supported by hpcimage: use "
            "docker:// or oras://",
    "http": "http:// downloads are not supported by hpcimage: download the image, then "
            "use the file",
    "ipfs": "ipfs:// is not supported by hpcimage: use docker:// or oras://",
    "docker-daemon": "docker-daemon:// needs a Docker daemon, which hpcimage does not "
                     "use: `docker save` the image and build from the archive",
}
REFUSED["https"] = REFUSED["http"]
SIF_MAGIC = b"SIF_MAGIC\0"


def split_uri(text):
    """(scheme, reference) of TEXT; UsageError for what hpcimage cannot pull."""
    scheme, sep, rest = text.partition("://")
    if not sep:
        raise UsageError(f"{text}: not a registry reference (docker://REF or oras://REF)")
    if scheme in REFUSED:
        raise UsageError(f"{text}: {REFUSED[scheme]}")
    if scheme not in SCHEMES:
        raise UsageError(f"{text}: unsupported transport {scheme}:// (hpcimage pulls "
                         "docker:// and oras://)")
    if not rest.strip("/"):
        raise UsageError(f"{text}: no image named after {scheme}://")
    return scheme, rest


def reference(text):
    """(scheme, registry.Reference) of a docker:// or oras:// URI."""
    scheme, rest = split_uri(text)
    where = "\0"
    try:
        ref = registry.Reference.parse(rest, where=where, docker_hub=scheme == "docker")
    except UsageError as e:
        raise UsageError(text + ": " + e.message.replace(f"{where}: From: {rest}: ", "")
                         .replace(f"{where}: From: ", "")) from None
    return scheme, ref


def default_name(text):
    """Apptainer's name for `pull docker://REF` without OUTPUT (uri.GetName): the last
    path component and its tag (latest when none): NAME_TAG.sif."""
    _, rest = split_uri(text)
    last = rest.lstrip("/").split("/")[-1]
    tag = "latest"
    if ":" in last:
        parts = last.split(":")
        last, tag = parts[0], parts[1].split(",")[0]
    return f"{last}_{tag}.sif"


# ------------------------------------------------------------------ progress

class Progress:
    """One line per download on a terminal (stderr), rewritten in place; silent when
    stderr is not a terminal (or quiet)."""

    def __init__(self, quiet=None):
        if quiet is None:
            try:
                quiet = not os.isatty(2)
            except OSError:
                quiet = True
        self.quiet = quiet
        self.last = 0.0

    def say(self, msg):
        if not self.quiet:
            sys.stderr.write(f"hpcimage: {msg}\n")
            sys.stderr.flush()

    def blob(self, digest, size):
        if self.quiet:
            return None
        import time
        label = digest.partition(":")[2][:12]

        def update(done, end=False):
            now = time.monotonic()
            if not end and (now - self.last < 0.1 or done == size):
                return
            self.last = now
            total = f" / {_size(size)}" if size else ""
            pct = f" {100 * done // size:3d}%" if size else ""
            sys.stderr.write(f"\rhpcimage: copying blob {label} {_size(done)}{total}{pct}"
                             "\033[K" + ("\n" if end else ""))
            sys.stderr.flush()
        return update


def _size(n):
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


# ------------------------------------------------------------------ resolving

def resolve(client, ref, where, arch=None):
    """(digest, manifest) of the image REF names for ARCH (default: this node's)."""
    mt, doc, digest = client.manifest(ref.repository, ref.ref)
    for _ in range(3):
        if mt in oci.INDEX_TYPES or ("manifests" in doc and "layers" not in doc):
            desc = oci.select_platform(doc.get("manifests") or [], where, arch)
            mt, doc, digest = client.manifest(ref.repository, desc["digest"])
            continue
        return digest, doc
    raise HpcimageError(f"{where}: nested manifest lists")


def _ref_file(uri_key):
    return os.path.join(registry.cache_dir(), "refs",
                        hashlib.sha256(uri_key.encode()).hexdigest())


def _remember(uri_key, digest):
    path = _ref_file(uri_key)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fsutil.write_atomic(path, f"{digest} {uri_key}\n")


def _recall(uri_key):
    try:
        with open(_ref_file(uri_key)) as f:
            digest, _, key = f.read().strip().partition(" ")
    except OSError:
        return None
    return digest if key == uri_key else None


def _is_sif(path):
    try:
        with open(path, "rb") as f:
            return f.read(64)[32:42] == SIF_MAGIC
    except OSError:
        return False


def _sif_path(digest):
    algo, _, hexd = digest.partition(":")
    return os.path.join(registry.cache_dir(), "sif", algo, hexd + ".sif")


def cached_sif(uri, arch=None, progress=None):
    """The path of the SIF that URI (docker:// or oras://) names, in the cache,
    downloaded and converted when it is not there yet."""
    from hpcimage.image.arch import host
    progress = progress or Progress()
    scheme, ref = reference(uri)
    if arch is not None:
        from hpcimage.image.sif import _GOARCH_CODES
        if arch not in _GOARCH_CODES:
            raise UsageError(f"--arch {arch}: not an architecture (one of: "
                             f"{', '.join(sorted(_GOARCH_CODES))})")
    key = f"{scheme}://{ref}|{arch or host()}"
    if ref.digest:                  # by digest: what it names cannot change
        path = _cached_path(scheme, _recall(key)) or _cached_path(scheme, ref.digest)
        if path:
            return path
    client = registry.Client(ref.registry, uri)
    try:
        digest, doc = resolve(client, ref, uri, arch)
    except registry.Unreachable as e:
        digest = _recall(key)
        path = _cached_path(scheme, digest)
        if path is None:
            raise HpcimageError(f"{e.message} (and no cached copy of {uri})") from None
        sys.stderr.write(f"hpcimage: warning: {e.message}: using the cached copy of {uri} "
                         f"({digest})\n")
        return path
    if scheme == "oras":
        path = _oras_sif(client, ref, digest, doc, uri, progress)
    else:
        path = _sif_path(digest)
        if not _is_sif(path):
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with _Lock(path + ".lock"):     # the ranks of a job convert it once
                if not _is_sif(path):
                    _convert(client, ref, digest, doc, uri, arch or host(), path, progress)
    _remember(key, digest)
    return path


def _cached_path(scheme, digest):
    if not digest:
        return None
    if scheme == "docker":
        p = _sif_path(digest)
        return p if _is_sif(p) else None
    algo, _, hexd = digest.partition(":")
    p = os.path.join(registry.cache_dir(), "oras", algo, hexd)
    try:
        with open(p) as f:
            blob = f.read().strip()
    except OSError:
        return None
    b = os.path.join(registry.cache_dir(), "blobs", *blob.split(":", 1))
    return b if _is_sif(b) else None


def _oras_sif(client, ref, mdigest, doc, uri, progress):
    for ld in doc.get("layers") or []:
        if ld.get("mediaType") == registry.SIF_LAYER:
            break
    else:
        raise HpcimageError(f"{uri}: no SIF layer ({registry.SIF_LAYER}) in the manifest: "
                            "not an image pushed with oras:// (try docker://)")
    path = client.blob(ref.repository, ld.get("digest"), ld.get("size"),
                       progress=progress.blob(ld.get("digest", ""), ld.get("size")))
    if not _is_sif(path):
        raise HpcimageError(f"{uri}: the SIF layer {ld.get('digest')} is not a SIF file")
    # manifest digest -> the SIF blob, for the offline fallback
    algo, _, hexd = mdigest.partition(":")
    d = os.path.join(registry.cache_dir(), "oras", algo)
    os.makedirs(d, exist_ok=True)
    fsutil.write_atomic(os.path.join(d, hexd), ld["digest"] + "\n")
    return path


def _convert(client, ref, digest, doc, uri, arch, path, progress):
    """Download the blobs of DOC (with progress), then build the SIF at PATH."""
    if any(ld.get("mediaType") == registry.SIF_LAYER for ld in doc.get("layers") or []):
        raise UsageError(f"{uri}: a SIF stored as an ORAS artifact, not a container "
                         f"image: use oras://{uri.partition('://')[2]}")
    cfg = doc.get("config") or {}
    client.blob(ref.repository, cfg.get("digest"), cfg.get("size"))
    for ld in doc.get("layers") or []:
        client.blob(ref.repository, ld.get("digest"), ld.get("size"),
                    progress=progress.blob(ld.get("digest", ""), ld.get("size")))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    pinned = f"{ref.registry}/{ref.repository}@{digest}"
    text = f"Bootstrap: docker\nFrom: {pinned}\n"
    progress.say(f"converting {uri} ({digest}) to SIF")
    from hpcimage.image.arch import host
    from hpcimage.imagebuild import builder, convert
    with _quiet(True):          # its lines (ids, temporary paths) are not the user's
        if arch == host():
            builder.build(path, f"{uri}", force=True, notest=True, text=text)
            return
        # another architecture: the SIF must say so (the build writes this node's)
        from hpcimage.image import sif as _sif
        sqfs = convert.temp_beside(path) + ".sqfs"
        try:
            builder.build(sqfs, f"{uri}", force=True, notest=True, text=text)
            deffile, labels = convert.squashfs_metadata(sqfs)
            _sif.write_sif(path, sqfs, deffile=deffile, labels=labels, arch=arch)
        finally:
            try:
                os.unlink(sqfs)
            except FileNotFoundError:
                pass


class _Lock:
    """An exclusive flock(2) on PATH (created, left in place: an empty file)."""

    def __init__(self, path):
        self.path, self.fd = path, None

    def __enter__(self):
        import fcntl
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        fcntl.flock(self.fd, fcntl.LOCK_EX)

    def __exit__(self, *exc):
        os.close(self.fd)
        return False


class _quiet:
    """The build's own lines (`hpcimage: build: ...`, on stderr, also from its forked
    namespace process) go to /dev/null when QUIET; its errors come back as
    HpcimageError, said by the caller once stderr is restored."""

    def __init__(self, quiet):
        self.quiet, self.saved = quiet, None

    def __enter__(self):
        if self.quiet:
            sys.stderr.flush()
            self.saved = os.dup(2)
            null = os.open(os.devnull, os.O_WRONLY)
            os.dup2(null, 2)
            os.close(null)

    def __exit__(self, *exc):
        if self.saved is not None:
            sys.stderr.flush()
            os.dup2(self.saved, 2)
            os.close(self.saved)
        return False


# ------------------------------------------------------------------ the commands

def pull(out, uri, force=False, arch=None, quiet=None):
    """`hpcimage pull [--force] [--arch ARCH] [OUT] URI`: the SIF URI names, at OUT
    (default: NAME_TAG.sif), written under a temporary name and renamed into place."""
    split_uri(uri)
    out = out or default_name(uri)
    if os.path.lexists(out) and not force:
        raise UsageError(f"{out}: image file already exists: will not overwrite "
                         "(use --force)")
    parent = os.path.dirname(os.path.abspath(out))
    if not os.path.isdir(parent):
        raise UsageError(f"{out}: directory {parent} does not exist")
    if os.path.isdir(out) and not os.path.islink(out):
        raise UsageError(f"{out}: is a directory")
    progress = Progress(quiet)
    src = cached_sif(uri, arch, progress)
    umask = os.umask(0)
    os.umask(umask)
    try:
        with open(src, "rb") as f, fsutil.AtomicFile(out, 0o777 & ~umask) as dst:
            while True:
                b = f.read(1 << 20)
                if not b:
                    break
                dst.write(b)
    except OSError as e:
        raise HpcimageError(f"{out}: cannot write: {e.strerror}") from None
    progress.say(f"pulled {uri} to {out}")
    return out
