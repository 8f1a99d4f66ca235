"""Test helpers: OCI/Docker images made with tarfile, a local registry (Debian's
`docker-registry` package, on 127.0.0.1, config in a temporary directory), a tiny
pusher speaking the Docker Registry HTTP API v2 (urllib), and a token-auth front that
asks for `Bearer` tokens the way Docker Hub does."""
import gzip
import hashlib
import http.server
import io
import json
import os
import socket
import subprocess
import tarfile
import threading
import time
import urllib.error
import urllib.request

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"
SIF_LAYER = "application/vnd.sylabs.sif.layer.v1.sif"
SIF_CONFIG = "application/vnd.sylabs.sif.config.v1+json"


def digest(data):
    return "sha256:" + hashlib.sha256(data).hexdigest()


def tar_layer(entries, compress=True):
    """entries: (name, kind, payload, mode) with kind file|dir|symlink|hardlink; payload
    bytes (file) or the link target."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for name, kind, payload, mode in entries:
            ti = tarfile.TarInfo(name)
            ti.mode, ti.mtime, ti.uid, ti.gid = mode, 1700000000, 0, 0
            if kind == "file":
                ti.size = len(payload)
                tf.addfile(ti, io.BytesIO(payload))
                continue
            ti.type = {"dir": tarfile.DIRTYPE, "symlink": tarfile.SYMTYPE,
                       "hardlink": tarfile.LNKTYPE}[kind]
            if kind != "dir":
                ti.linkname = payload
            tf.addfile(ti)
    data = buf.getvalue()
    return gzip.compress(data, mtime=0) if compress else data


def dir_layer(path, compress=True):
    """A layer holding the tree at path (owned by root)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        def reset(ti):
            ti.uid = ti.gid = 0
            ti.uname = ti.gname = "root"
            return ti
        for name in sorted(os.listdir(path)):
            tf.add(os.path.join(path, name), arcname=name, filter=reset)
    data = buf.getvalue()
    return gzip.compress(data, mtime=0) if compress else data


def image_config(env=(), cmd=None, entrypoint=None, workdir=None, labels=None,
                 arch="amd64"):
    cfg = {"Env": list(env)}
    if cmd is not None:
        cfg["Cmd"] = cmd
    if entrypoint is not None:
        cfg["Entrypoint"] = entrypoint
    if workdir:
        cfg["WorkingDir"] = workdir
    if labels:
        cfg["Labels"] = labels
    return {"architecture": arch, "os": "linux", "config": cfg,
            "rootfs": {"type": "layers", "diff_ids": []}}


def oci_manifest(layers, config):
    """(manifest bytes, {digest: bytes}) of an OCI image."""
    cfg = json.dumps(config).encode()
    blobs = {digest(cfg): cfg}
    for ly in layers:
        blobs[digest(ly)] = ly
    man = {"schemaVersion": 2, "mediaType": OCI_MANIFEST,
           "config": {"mediaType": OCI_CONFIG, "digest": digest(cfg), "size": len(cfg)},
           "layers": [{"mediaType": OCI_LAYER, "digest": digest(ly), "size": len(ly)}
                      for ly in layers]}
    return json.dumps(man).encode(), blobs


def _add(tf, name, data):
    ti = tarfile.TarInfo(name)
    ti.size, ti.mode, ti.mtime = len(data), 0o644, 1700000000
    tf.addfile(ti, io.BytesIO(data))


def docker_archive(path, layers, config, tag="test/image:1.0"):
    """What `docker save` writes (the classic layout: manifest.json, <id>/layer.tar)."""
    cfg = json.dumps(config).encode()
    cfg_name = hashlib.sha256(cfg).hexdigest() + ".json"
    with tarfile.open(path, "w") as tf:
        names = []
        for i, ly in enumerate(layers):
            n = f"{i:02d}{hashlib.sha256(ly).hexdigest()[:20]}/layer.tar"
            _add(tf, n, gzip.decompress(ly) if ly[:2] == b"\x1f\x8b" else ly)
            names.append(n)
        _add(tf, cfg_name, cfg)
        _add(tf, "manifest.json", json.dumps(
            [{"Config": cfg_name, "RepoTags": [tag], "Layers": names}]).encode())


def oci_archive(path, layers, config, tag="1.0"):
    """An OCI image layout in a tarball (oci-layout, index.json, blobs/sha256/...)."""
    man, blobs = oci_manifest(layers, config)
    blobs[digest(man)] = man
    index = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [
        {"mediaType": OCI_MANIFEST, "digest": digest(man), "size": len(man),
         "annotations": {"org.opencontainers.image.ref.name": tag}}]}
    with tarfile.open(path, "w") as tf:
        _add(tf, "oci-layout", b'{"imageLayoutVersion": "1.0.0"}')
        _add(tf, "index.json", json.dumps(index).encode())
        for d, data in blobs.items():
            _add(tf, "blobs/sha256/" + d.split(":")[1], data)


# ------------------------------------------------------------------ the registry

def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Registry:
    """docker-registry serving 127.0.0.1:port from a temporary directory."""

    BINARY = "/usr/bin/docker-registry"

    def __init__(self, workdir):
        self.dir = os.path.join(workdir, "registry")
        os.makedirs(self.dir, exist_ok=True)
        self.port = free_port()
        self.proc = None

    @classmethod
    def unavailable(cls):
        if not os.access(cls.BINARY, os.X_OK):
            return "docker-registry not installed (apt-get install docker-registry)"
        return None

    def start(self):
        cfg = os.path.join(self.dir, "config.yml")
        with open(cfg, "w") as f:
            f.write(f"version: 0.1\nlog:\n  level: error\n  accesslog:\n    disabled: true\n"
                    f"storage:\n  filesystem:\n    rootdirectory: {self.dir}/data\n"
                    f"http:\n  addr: 127.0.0.1:{self.port}\n")
        self.log = open(os.path.join(self.dir, "log"), "wb")
        self.proc = subprocess.Popen([self.BINARY, "serve", cfg], stdout=self.log,
                                     stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                break
            try:
                with urllib.request.urlopen(self.url("/v2/"), timeout=2):
                    return self
            except (urllib.error.URLError, OSError):
                time.sleep(0.1)
        self.stop()
        with open(os.path.join(self.dir, "log"), errors="replace") as f:
            raise RuntimeError("docker-registry did not start: " + f.read()[-500:])

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if getattr(self, "log", None):
            self.log.close()

    @property
    def host(self):
        return f"127.0.0.1:{self.port}"

    def url(self, path):
        return f"http://{self.host}{path}"

    def _req(self, method, url, data=None, ctype=None):
        req = urllib.request.Request(url, data=data, method=method)
        if ctype:
            req.add_header("Content-Type", ctype)
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, r.headers

    def push_blob(self, repo, data):
        d = digest(data)
        status, headers = self._req("POST", self.url(f"/v2/{repo}/blobs/uploads/"))
        assert status == 202, status
        loc = headers["Location"]
        if loc.startswith("/"):
            loc = self.url(loc)
        loc += ("&" if "?" in loc else "?") + "digest=" + d
        status, _ = self._req("PUT", loc, data, "application/octet-stream")
        assert status == 201, status
        return d

    def push_manifest(self, repo, ref, data, media_type=OCI_MANIFEST):
        status, _ = self._req("PUT", self.url(f"/v2/{repo}/manifests/{ref}"), data, media_type)
        assert status == 201, status
        return digest(data)

    def push_image(self, repo, tag, layers, config):
        man, blobs = oci_manifest(layers, config)
        for data in blobs.values():
            self.push_blob(repo, data)
        return self.push_manifest(repo, tag, man)

    def push_index(self, repo, tag, platforms):
        """platforms: [(arch, layers, config)] -> an OCI index under tag."""
        entries = []
        for arch, layers, config in platforms:
            man, blobs = oci_manifest(layers, config)
            for data in blobs.values():
                self.push_blob(repo, data)
            d = self.push_manifest(repo, digest(man), man)
            entries.append({"mediaType": OCI_MANIFEST, "digest": d, "size": len(man),
                            "platform": {"os": "linux", "architecture": arch}})
        index = json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX,
                            "manifests": entries}).encode()
        return self.push_manifest(repo, tag, index, OCI_INDEX)

    def push_sif(self, repo, tag, sif_bytes):
        """An ORAS artifact holding a SIF, as `apptainer push oras://` lays it out."""
        cfg = b"{}"
        self.push_blob(repo, cfg)
        self.push_blob(repo, sif_bytes)
        man = json.dumps({"schemaVersion": 2, "mediaType": OCI_MANIFEST,
                          "config": {"mediaType": SIF_CONFIG, "digest": digest(cfg),
                                     "size": len(cfg)},
                          "layers": [{"mediaType": SIF_LAYER, "digest": digest(sif_bytes),
                                      "size": len(sif_bytes),
                                      "annotations": {"org.opencontainers.image.title":
                                                      "image.sif"}}]}).encode()
        return self.push_manifest(repo, tag, man)

    def blob_file(self, d):
        """Where the registry stores blob d (to corrupt it in a test)."""
        h = d.split(":")[1]
        return os.path.join(self.dir, "data/docker/registry/v2/blobs/sha256", h[:2], h, "data")


class TokenFront:
    """A front for a registry that answers 401 + `WWW-Authenticate: Bearer` until the
    client brings the token its /token endpoint hands out (Docker Hub's scheme)."""

    TOKEN = "hpcimage-test-token"

    def __init__(self, upstream):
        self.upstream = upstream
        self.port = free_port()
        self.token_requests = []
        front = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_GET(self):
                if self.path.startswith("/token"):
                    front.token_requests.append(self.path)
                    body = json.dumps({"token": front.TOKEN}).encode()
                    self.send_response(200)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                    return
                if self.headers.get("Authorization") != f"Bearer {front.TOKEN}":
                    self.send_response(401)
                    self.send_header("WWW-Authenticate",
                                     f'Bearer realm="http://127.0.0.1:{front.port}/token",'
                                     'service="hpcimage-test",scope="repository:x:pull"')
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                req = urllib.request.Request(front.upstream + self.path,
                                             headers={"Accept": self.headers.get("Accept", "*/*")})
                try:
                    with urllib.request.urlopen(req, timeout=30) as r:
                        body = r.read()
                        self.send_response(r.status)
                        for k in ("Content-Type", "Docker-Content-Digest"):
                            if r.headers.get(k):
                                self.send_header(k, r.headers[k])
                except urllib.error.HTTPError as e:
                    body = e.read()
                    self.send_response(e.code)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def start(self):
        self.thread.start()
        return self

    def stop(self):
        self.server.shutdown()
        self.server.server_close()

    @property
    def host(self):
        return f"localhost:{self.port}"

