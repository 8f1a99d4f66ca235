"""Pulling from a registry that speaks the Docker Registry HTTP API v2 (OCI distribution).

    Bootstrap: docker        From: [registry/]repository[:tag|@sha256:...]
    Bootstrap: oras          From: registry/repository:tag   (a SIF pushed with ORAS)

Docker Hub is the default registry (`ubuntu:22.04` is registry-1.docker.io/library/
ubuntu:22.04); `Registry:` and `Namespace:` header lines are honoured as Apptainer's.
Plain HTTP is used for localhost/127.0.0.1/[::1] and for HPCIMAGE_NOHTTPS=1 (or
APPTAINER_NOHTTPS=1), HTTPS otherwise. Authentication: a 401 carrying
`WWW-Authenticate: Bearer realm=...,service=...,scope=...` fetches a token from the realm
(anonymously, or with HPCIMAGE_REGISTRY_USERNAME/PASSWORD or APPTAINER_DOCKER_USERNAME/
PASSWORD); `Basic` uses those credentials directly. A manifest list / OCI index picks the
manifest of this host's platform. Every blob and every manifest fetched by digest is
verified against its digest (sha256) before use; blobs are cached under cache_dir()/blobs
by digest. A registry that does not answer at all raises Unreachable (`hpcimage exec
docker://` then falls back to its cache). urllib only.
"""
import base64
import hashlib
import json
import os
import re
import urllib.error
import urllib.parse
import urllib.request

from hpcimage import fsutil
from hpcimage.errors import HpcimageError, UsageError
from hpcimage.imagebuild import oci

DOCKER_HUB = "registry-1.docker.io"
ACCEPT = ", ".join(oci.INDEX_TYPES + oci.MANIFEST_TYPES)
SIF_LAYER = "application/vnd.sylabs.sif.layer.v1.sif"
_REPO_RE = re.compile(r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*(?:/[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*)*\Z")
_TAG_RE = re.compile(r"[\w][\w.-]{0,127}\Z")
TIMEOUT = 60


class Unreachable(HpcimageError):
    """The registry could not be reached at all (no answer, not an HTTP error)."""


class Reference:
    __slots__ = ("registry", "repository", "tag", "digest")

    def __init__(self, registry, repository, tag=None, digest=None):
        self.registry, self.repository, self.tag, self.digest = registry, repository, tag, digest

    @property
    def ref(self):
        return self.digest or self.tag

    def __str__(self):
        return f"{self.registry}/{self.repository}" + (
            f"@{self.digest}" if self.digest else f":{self.tag}")

    @classmethod
    def parse(cls, text, registry=None, namespace=None, where="From", docker_hub=True):
        s = text.strip()
        for p in ("docker://", "oras://", "//"):
            if s.startswith(p):
                s = s[len(p):]
        digest = None
        if "@" in s:
            s, digest = s.split("@", 1)
            if not re.match(r"sha256:[0-9a-f]{64}\Z", digest):
                raise UsageError(f"{where}: From: {text}: bad digest {digest!r}")
        first, slash, rest = s.partition("/")
        if slash and ("." in first or ":" in first or first == "localhost"):
            reg, path = first, rest
        else:
            reg, path = None, s
        tag = None
        last = path.rsplit("/", 1)[-1]
        if ":" in last:
            path, tag = path.rsplit(":", 1)
            if not _TAG_RE.match(tag):
                raise UsageError(f"{where}: From: {text}: bad tag {tag!r}")
        reg = reg or registry
        if reg is None:
            if not docker_hub:
                raise UsageError(f"{where}: From: {text}: name the registry (host/repository:tag)")
            reg = DOCKER_HUB
        if reg in ("docker.io", "index.docker.io"):
            reg = DOCKER_HUB
        if namespace and "/" not in path:
            path = f"{namespace}/{path}"
        if reg == DOCKER_HUB and "/" not in path:
            path = "library/" + path
        if not _REPO_RE.match(path):
            raise UsageError(f"{where}: From: {text}: bad repository name {path!r}")
        return cls(reg, path, tag or ("latest" if not digest else None), digest)


def _credentials():
    for p in ("HPCIMAGE_REGISTRY_", "APPTAINER_DOCKER_", "SINGULARITY_DOCKER_"):
        u, pw = os.environ.get(p + "USERNAME"), os.environ.get(p + "PASSWORD")
        if u and pw is not None:
            return u, pw
    return None


def _parse_challenge(header):
    scheme, _, rest = header.strip().partition(" ")
    params = dict(re.findall(r'(\w+)="([^"]*)"', rest))
    return scheme.lower(), params


class _NoRedirectAuth(urllib.request.HTTPRedirectHandler):
    """Follow redirects (blob storage) but drop Authorization when the host changes."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        new = super().redirect_request(req, fp, code, msg, headers, newurl)
        if new is not None and urllib.parse.urlsplit(newurl).netloc != \
                urllib.parse.urlsplit(req.full_url).netloc:
            new.headers.pop("Authorization", None)
            new.unredirected_hdrs.pop("Authorization", None)
        return new


class Client:
    def __init__(self, registry, where):
        self.registry, self.where = registry, where
        host = registry.rsplit(":", 1)[0].strip("[]")
        insecure = host in ("localhost", "127.0.0.1", "::1") or any(
            os.environ.get(v) in ("1", "true", "yes")
            for v in ("HPCIMAGE_NOHTTPS", "APPTAINER_NOHTTPS", "SINGULARITY_NOHTTPS"))
        self.base = f"{'http' if insecure else 'https'}://{registry}"
        self.auth = None
        self.opener = urllib.request.build_opener(_NoRedirectAuth)

    def _request(self, url, accept=None, method="GET"):
        req = urllib.request.Request(url, method=method)
        if accept:
            req.add_header("Accept", accept)
        req.add_header("User-Agent", "hpcimage")
        if self.auth:
            req.add_header("Authorization", self.auth)
        return req

    def open(self, path, accept=None):
        url = self.base + path
        for attempt in range(2):
            try:
                return self.opener.open(self._request(url, accept), timeout=TIMEOUT)
            except urllib.error.HTTPError as e:
                if e.code == 401 and attempt == 0:
                    self._authenticate(e.headers.get("WWW-Authenticate", ""))
                    e.close()
                    continue
                body = e.read(2000).decode(errors="replace")
                e.close()
                raise HpcimageError(f"{self.where}: {self.registry}: {path}: HTTP {e.code}"
                                    + _registry_error(body)) from None
            except (urllib.error.URLError, OSError) as e:
                reason = getattr(e, "reason", e)
                raise Unreachable(f"{self.where}: cannot reach registry {self.registry}: "
                                  f"{reason}") from None
        raise HpcimageError(f"{self.where}: {self.registry}: authentication refused")

    def _authenticate(self, challenge):
        scheme, params = _parse_challenge(challenge)
        creds = _credentials()
        if scheme == "basic":
            if not creds:
                raise HpcimageError(f"{self.where}: {self.registry} wants a login: set "
                                    "HPCIMAGE_REGISTRY_USERNAME and HPCIMAGE_REGISTRY_PASSWORD")
            self.auth = "Basic " + base64.b64encode(f"{creds[0]}:{creds[1]}".encode()).decode()
            return
        if scheme != "bearer" or "realm" not in params:
            raise HpcimageError(f"{self.where}: {self.registry}: unsupported authentication "
                                f"{challenge!r}")
        q = {k: params[k] for k in ("service", "scope") if k in params}
        url = params["realm"] + ("&" if "?" in params["realm"] else "?") + urllib.parse.urlencode(q)
        req = urllib.request.Request(url, headers={"User-Agent": "hpcimage"})
        if creds:
            req.add_header("Authorization", "Basic " + base64.b64encode(
                f"{creds[0]}:{creds[1]}".encode()).decode())
        try:
            with urllib.request.urlopen(req, timeout=TIMEOUT) as r:
                data = json.loads(r.read(1 << 20))
        except urllib.error.HTTPError as e:
            raise HpcimageError(f"{self.where}: {self.registry}: token request refused "
                                f"(HTTP {e.code})") from None
        except (urllib.error.URLError, OSError) as e:
            raise Unreachable(f"{self.where}: {self.registry}: token request failed: "
                              f"{getattr(e, 'reason', e)}") from None
        except ValueError as e:
            raise HpcimageError(f"{self.where}: {self.registry}: token request failed: "
                                f"{e}") from None
        token = data.get("token") or data.get("access_token")
        if not token:
            raise HpcimageError(f"{self.where}: {self.registry}: the token service gave no token")
        self.auth = "Bearer " + token

    def manifest(self, repo, ref):
        """(media type, bytes, digest) of a manifest, verified when REF is a digest
        (or the registry names the digest)."""
        with self.open(f"/v2/{repo}/manifests/{ref}", ACCEPT) as r:
            data = r.read(8 << 20)
            ctype = (r.headers.get("Content-Type") or "").split(";")[0].strip()
            named = r.headers.get("Docker-Content-Digest")
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        want = ref if ref.startswith("sha256:") else named
        if want and want.startswith("sha256:") and want != digest:
            raise HpcimageError(f"{self.where}: manifest {repo}@{ref}: digest mismatch "
                                f"(got {digest})")
        try:
            doc = json.loads(data)
        except ValueError:
            raise HpcimageError(f"{self.where}: manifest {repo}:{ref} is not JSON") from None
        mt = doc.get("mediaType") or ctype
        if doc.get("schemaVersion") == 1:
            raise HpcimageError(f"{self.where}: {repo}:{ref}: schema 1 manifests are not "
                                "supported (push the image again with a current client)")
        return mt, doc, digest

    def blob(self, repo, digest, size=None, progress=None):
        """The path of blob DIGEST in the cache, downloaded and verified if needed;
        progress(bytes so far, end=False) is called while it downloads."""
        oci._blob_name(digest, self.where)
        algo, _, hexd = digest.partition(":")
        d = os.path.join(cache_dir(), "blobs", algo)
        os.makedirs(d, exist_ok=True)
        path = os.path.join(d, hexd)
        if os.path.isfile(path):
            return path
        h = hashlib.new(algo)
        n = 0
        with fsutil.AtomicFile(path) as out, self.open(f"/v2/{repo}/blobs/{digest}") as r:
            while True:
                b = r.read(1 << 20)
                if not b:
                    break
                h.update(b)
                out.write(b)
                n += len(b)
                if progress:
                    progress(n)
            if progress:
                progress(n, end=True)
            if h.hexdigest() != hexd:
                raise HpcimageError(f"{self.where}: blob {digest} of {repo}: digest mismatch "
                                    f"(got {algo}:{h.hexdigest()}): refusing it")
            if size is not None and n != size:
                raise HpcimageError(f"{self.where}: blob {digest}: {n} bytes, the manifest "
                                    f"says {size}")
        return path


def _registry_error(body):
    try:
        errs = json.loads(body).get("errors") or []
        if errs:
            return ": " + "; ".join(f"{e.get('code')}: {e.get('message')}" for e in errs)
    except (ValueError, AttributeError):
        pass
    return ""


def cache_dir():
    """HPCIMAGE_CACHEDIR; else APPTAINER_CACHEDIR (SINGULARITY_CACHEDIR)/hpcimage, a
    directory of its own beside Apptainer's cache; else $XDG_CACHE_HOME/hpcimage or
    ~/.cache/hpcimage."""
    d = os.environ.get("HPCIMAGE_CACHEDIR")
    if d:
        return d
    for v in ("APPTAINER_CACHEDIR", "SINGULARITY_CACHEDIR"):
        if os.environ.get(v):
            return os.path.join(os.environ[v], "hpcimage")
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(
        os.environ.get("HOME") or "/tmp", ".cache")
    return os.path.join(base, "hpcimage")


def _resolve_manifest(client, ref, where):
    mt, doc, _ = client.manifest(ref.repository, ref.ref)
    for _ in range(3):
        if mt in oci.INDEX_TYPES or ("manifests" in doc and "layers" not in doc):
            desc = oci.select_platform(doc.get("manifests") or [], f"{where}: {ref}")
            mt, doc, _ = client.manifest(ref.repository, desc["digest"])
            continue
        return doc
    raise HpcimageError(f"{where}: {ref}: nested manifest lists")


def pull(ref, where):
    """Download (or find cached) and verify every blob of REF; an oci.Image."""
    print(f"hpcimage: build: pulling {ref}", flush=True, file=__import__("sys").stderr)
    client = Client(ref.registry, where)
    doc = _resolve_manifest(client, ref, where)
    cfg_desc = doc.get("config") or {}
    cfg_path = client.blob(ref.repository, cfg_desc.get("digest"), cfg_desc.get("size"))
    with open(cfg_path, "rb") as f:
        config = oci._json(f.read(), f"{where}: config")
    paths = [client.blob(ref.repository, ld.get("digest"), ld.get("size"))
             for ld in doc.get("layers") or []]
    return oci.Image(config, [lambda p=p: open(p, "rb") for p in paths], f"{where}: {ref}")


def pull_sif(ref, where):
    """The cached path of the SIF that REF (an ORAS artifact) holds."""
    client = Client(ref.registry, where)
    doc = _resolve_manifest(client, ref, where)
    for ld in doc.get("layers") or []:
        if ld.get("mediaType") == SIF_LAYER:
            return client.blob(ref.repository, ld.get("digest"), ld.get("size"))
    raise HpcimageError(f"{where}: {ref}: no SIF layer ({SIF_LAYER}) in the manifest")
