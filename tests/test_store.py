"""The central image store: `hpcimage publish` (as root) and `image-update` (as the test
user): placement, manifest, verification, the wrappers' choice of the local copy,
concurrency, and the faults (corrupt store file, full disk, kill -9, symlinks,
unreachable store)."""
import calendar
import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import tempfile
import textwrap
import threading
import time
from pathlib import Path

import pytest

from conftest import PY, _cached, _mksquashfs, cli_argv, on_terminal
from modtools import wrapper_code

from hpcimage.config import site as sitemod
from hpcimage.config.policy import Policy
from hpcimage.errors import UsageError
from hpcimage.runtime import localcopy as local

TESTS = Path("/tmp/hpcimage-tests")


# --------------------------------------------------------------------------
# Images: two versions of the demo image that say which they are
# --------------------------------------------------------------------------

def _versioned(demo_dir, version, extra_mib=0):
    def build(path):
        with tempfile.TemporaryDirectory(dir=path.parent) as d:
            root = Path(d) / "root"
            shutil.copytree(demo_dir, root, symlinks=True)
            (root / "hpcimage-version").write_text(f"{version}\n")
            if extra_mib:
                rnd = random.Random(version)
                with open(root / "payload", "wb") as f:
                    for _ in range(extra_mib):
                        f.write(rnd.randbytes(1 << 20))
            _mksquashfs(root, path)
    return build


@pytest.fixture(scope="session")
def v1(demo_dir):
    return _cached("store-v1.sqfs", _versioned(demo_dir, "1"))


@pytest.fixture(scope="session")
def v2(demo_dir):
    return _cached("store-v2.sqfs", _versioned(demo_dir, "2"))


@pytest.fixture(scope="session")
def big_a(demo_dir):
    return _cached("store-big-a.sqfs", _versioned(demo_dir, "big-a", 48))


@pytest.fixture(scope="session")
def big_b(demo_dir):
    return _cached("store-big-b.sqfs", _versioned(demo_dir, "big-b", 48))


def sha(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# --------------------------------------------------------------------------
# A site with a store
# --------------------------------------------------------------------------

class Store:
    """site.yaml + store (root's) + rendered wrappers; a local directory (the user's)."""

    def __init__(self, top, userdir, user, keep=2, extra=""):
        self.top, self.user = top, user
        self.site = top / "site.yaml"
        self.dir = top / "store"
        self.image = self.dir / "Demo-1.0.sqfs"
        self.local = userdir / "local"
        self.copy = self.local / "Demo-1.0.sqfs"
        self.write_site(keep, extra)

    def write_site(self, keep=2, extra=""):
        self.site.write_text(textwrap.dedent(f"""\
            store: store
            python: {PY}
            keep: {keep}
            images:
              - name: Demo
                version: "1.0"
                file: Demo-1.0.sqfs
              - name: Other
                version: "1"
                file: Other-1.sqfs
            """) + extra)
        r = subprocess.run(cli_argv("generate", "--site", str(self.site)), capture_output=True,
                           text=True)
        assert r.returncode == 0, r.stderr
        subprocess.run(["chmod", "-R", "a+rX", str(self.top)], check=True)

    def publish(self, src, name="Demo", version="1.0", *more, ok=True):
        r = subprocess.run(cli_argv("publish", str(src), "--name", name, "--version", version,
                                    "--site", str(self.site), *more),
                           capture_output=True, text=True, cwd="/")
        if ok:
            assert r.returncode == 0, r.stderr
        return r

    def manifest(self):
        return json.loads((self.dir / "hpcimage-manifest.json").read_text())

    def env(self, **extra):
        e = {"PATH": f"{self.top}/wrappers:/usr/bin:/bin", "HPCIMAGE_IMAGE": str(self.image),
             "HPCIMAGE_MODULE": "Demo/1.0", "HPCIMAGE_LOCAL": str(self.local)}
        e.update(extra)
        return {k: v for k, v in e.items() if v is not None}

    def update(self, *args, env=None, **kw):
        return self.user.run([str(self.top / "wrappers" / "image-update"), *args],
                             env=self.env(**(env or {})), **kw)

    def chosen(self, env=None):
        """The image the wrappers start now (from `image-exec --dry-run`)."""
        r = self.user.run([str(self.top / "wrappers" / "image-exec"), "--dry-run", "true"],
                          env=self.env(**(env or {})))
        assert r.returncode == 0, r.stderr
        for line in r.stdout.splitlines():
            if line.strip().startswith("env HPCIMAGE_CONTAINER="):
                return line.split("=", 1)[1]
        raise AssertionError(r.stdout)

    def run_image(self, *cmd, env=None):
        return self.user.run([str(self.top / "wrappers" / "image-exec"), *cmd],
                             env=self.env(**(env or {})))

    def temps(self):
        found = []
        for d in (self.local, self.dir):
            if d.is_dir():
                found += [p.name for p in d.iterdir() if ".hpcimage-tmp." in p.name]
        return found


@pytest.fixture
def store(userdir, user):
    TESTS.mkdir(exist_ok=True)
    TESTS.chmod(0o755)
    top = Path(tempfile.mkdtemp(dir=TESTS, prefix="store-"))
    top.chmod(0o755)
    s = Store(top, userdir, user)
    yield s
    subprocess.run(["chmod", "-R", "u+rwX", str(top)])
    shutil.rmtree(top, ignore_errors=True)


def ok(r):
    assert r.returncode == 0, (r.stdout, r.stderr)
    return r


def one_error(r, status, prefix, *needles):
    assert r.returncode == status, (r.returncode, r.stdout, r.stderr)
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(prefix + ": error: "), r.stderr
    assert "Traceback" not in r.stderr
    for n in needles:
        assert n in r.stderr, (n, r.stderr)
    return r


# --------------------------------------------------------------------------
# site.yaml: local and keep
# --------------------------------------------------------------------------

BASE = "store: /s\nimages: []\n"


def test_site_local_and_keep_defaults_and_site_json(tmp_path):
    s = sitemod.loads(BASE, base_dir=str(tmp_path))
    assert (s.local, s.keep) == ("~/.hpcimage/images", 2)
    assert s.policy()["local"] == "~/.hpcimage/images"
    s = sitemod.loads(BASE + "local: $SCRATCH/images/\nkeep: 0\n")
    assert (s.local, s.keep) == ("$SCRATCH/images", 0)
    assert sitemod.loads(BASE + "local: /scratch//img/\n").policy()["local"] == "/scratch/img"
    assert sitemod.loads(BASE + "local: ~/../x\n").local == "~/../x"     # not normalised away


@pytest.mark.parametrize("text, message", [
    ("local: images", "site.yaml:3: local: must be an absolute path, '~/...' or start with a "
                      "$VARIABLE, got 'images'"),
    ("local: ~other/x", "site.yaml:3: local: must be an absolute path"),
    ("local: [a]", "site.yaml:3: local: expected a path, got a list"),
    ("keep: -1", "site.yaml:3: keep: must be 0 or more, got -1"),
    ("keep: yes", "site.yaml:3: keep: expected a whole number, got a boolean"),
    ("keep: '2'", "site.yaml:3: keep: expected a whole number, got a string"),
    ("kep: 2", "site.yaml:3: kep: unknown key (did you mean 'keep'?"),
])
def test_site_local_and_keep_errors(text, message):
    with pytest.raises(UsageError) as e:
        sitemod.loads(BASE + text + "\n")
    assert e.value.message.startswith(message), e.value.message


# --------------------------------------------------------------------------
# The runtime's choice (hpcimage.runtime.localcopy), in process
# --------------------------------------------------------------------------

def test_expand():
    env = {"HOME": "/home/u", "SCRATCH": "/scratch/u", "A": "a"}
    assert local.expand("~/.hpcimage/images", env) == "/home/u/.hpcimage/images"
    assert local.expand("~", env) == "/home/u"
    assert local.expand("$SCRATCH/img", env) == "/scratch/u/img"
    assert local.expand("/x/${A}b/$A.c", env) == "/x/ab/a.c"
    assert local.expand("$NOPE/img", env) is None            # unset: no local directory
    assert local.expand("${A", env) is None
    assert local.expand("$A/x", env) is None                  # not absolute
    assert local.expand("/a/../b/", env) == "/b"
    assert local.local_dir(Policy.from_json({"local": "$SCRATCH/i"}), env) == "/scratch/u/i"
    assert local.local_dir(Policy.from_json({"local": "$SCRATCH/i"}),
                           dict(env, HPCIMAGE_LOCAL="/o")) == "/o"
    assert local.local_dir(Policy.from_json({}), env) == "/home/u/.hpcimage/images"


def _fake(tmp_path):
    storedir = tmp_path / "store"
    storedir.mkdir()
    image = storedir / "X.sqfs"
    image.write_bytes(b"hsqs new")
    d = tmp_path / "local"
    d.mkdir()
    copy = d / "X.sqfs"
    copy.write_bytes(b"hsqs old")
    (storedir / local.MANIFEST).write_text(json.dumps(
        {"images": {"X.sqfs": {"current": {"sha256": "aa" * 32}}}, "version": 1}))
    env = {"HPCIMAGE_LOCAL": str(d)}
    state = d / ".X.sqfs.hpcimage-state"
    os.symlink(local.format_state("aa" * 32, os.stat(copy), str(image)), state)
    return str(image), str(copy), state, env


def test_choose(tmp_path):
    image, copy, state, env = _fake(tmp_path)
    assert local.choose(image, Policy(), env) == copy                        # current
    assert local.choose(None, Policy(), env) is None
    assert local.choose(image, Policy(), {"HPCIMAGE_LOCAL": "$UNSET/x"}) == image
    # the manifest names another digest: the store's file
    m = Path(image).parent / local.MANIFEST
    m.write_text(m.read_text().replace("aa" * 32, "bb" * 32))
    assert local.choose(image, Policy(), env) == image
    m.write_text(m.read_text().replace("bb" * 32, "aa" * 32))
    # the copy changed after it was recorded (size, mtime or inode): the store's file
    os.utime(copy, ns=(0, 12345))
    assert local.choose(image, Policy(), env) == image
    state.unlink()
    os.symlink(local.format_state("aa" * 32, os.stat(copy), image), state)
    assert local.choose(image, Policy(), env) == copy
    # a garbled record, or a regular file in its place
    state.unlink()
    state.write_text("hpcimage-state-v1 " + "aa" * 32)
    assert local.choose(image, Policy(), env) == image


def test_choose_store_unreachable_or_unmanaged(tmp_path):
    image, copy, state, env = _fake(tmp_path)
    storedir = Path(image).parent
    (storedir / local.MANIFEST).unlink()
    assert local.choose(image, Policy(), env) == image          # no manifest: the store's file
    Path(image).unlink()
    assert local.choose(image, Policy(), env) == copy           # ... unless it is gone
    storedir.rename(tmp_path / "gone")
    assert local.choose(image, Policy(), env) == copy           # store unreachable: the copy
    (tmp_path / "gone").rename(storedir)
    (storedir / local.MANIFEST).write_text("{not json")
    Path(image).write_bytes(b"x")
    assert local.choose(image, Policy(), env) == image


def test_choose_ignores_a_symlinked_copy(tmp_path):
    image, copy, state, env = _fake(tmp_path)
    other = tmp_path / "elsewhere"
    other.write_bytes(b"hsqs old")
    os.unlink(copy)
    os.symlink(other, copy)
    state.unlink()
    os.symlink(local.format_state("aa" * 32, os.stat(other), image), state)
    assert local.choose(image, Policy(), env) == image


def test_choose_stays_on_the_hot_path(store, v1):
    """No json, re, hashlib, click or yaml imported; the image is not opened."""
    store.publish(v1)
    ok(store.update())
    code = ("import os, sys; from hpcimage.config import policy; from hpcimage.runtime import localcopy as local; "
            "site = policy.load_policy(os.environ); "
            "print(local.choose(os.environ['HPCIMAGE_IMAGE'], site, os.environ)); "
            "print(sorted(m for m in ('json', 're', 'hashlib', 'click', 'yaml', 'hpcimage.store')"
            " if m in sys.modules))")
    r = ok(store.user.run([PY, "-I", "-c", code], env=store.env(
        HPCIMAGE_SITE_CONFIG=f"{store.top}/wrappers/site.json")))
    assert r.stdout.splitlines() == [str(store.copy), "[]"]


# --------------------------------------------------------------------------
# hpcimage publish
# --------------------------------------------------------------------------

def test_publish_places_and_records(store, v1):
    r = store.publish(v1)
    assert f"publish: Demo/1.0 -> {store.image}" in r.stdout
    assert sha(store.image) == sha(v1)
    st = store.image.stat()
    assert st.st_mode & 0o7777 == 0o644
    m = store.manifest()
    assert m["version"] == 1 and "do not edit" in m["_comment"]
    rec = m["images"]["Demo-1.0.sqfs"]
    assert rec["module"] == "Demo/1.0" and rec["previous"] == []
    cur = rec["current"]
    assert cur["sha256"] == sha(v1) and cur["size"] == st.st_size
    assert cur["mtime_ns"] == st.st_mtime_ns and cur["file"] == "Demo-1.0.sqfs"
    assert cur["source"] == str(v1)
    assert cur["published"].endswith("Z") and cur["build_date"]          # SquashFS mkfs time
    assert cur["definition_sha256"] is None                               # none in the image
    assert (store.dir / "hpcimage-manifest.json").stat().st_mode & 0o7777 == 0o644
    assert store.temps() == []
    # generate pointed the module at it
    lua = (store.top / "modulefiles/Demo/1.0.lua").read_text()
    assert f'setenv("HPCIMAGE_IMAGE", "{store.image}")' in lua


def test_publish_definition_digest(store, v1, tmp_path):
    d = tmp_path / "demo.def"
    d.write_text("Bootstrap: scratch\n")
    store.publish(v1, "Demo", "1.0", "--definition", str(d))
    cur = store.manifest()["images"]["Demo-1.0.sqfs"]["current"]
    assert cur["definition_sha256"] == hashlib.sha256(b"Bootstrap: scratch\n").hexdigest()


def test_publish_a_sif_and_update_it(store, demo_sif):
    store.publish(demo_sif, "Other", "1")
    cur = store.manifest()["images"]["Other-1.sqfs"]["current"]
    assert cur["sha256"] == sha(demo_sif) and cur["build_date"].endswith("Z")   # SIF's ctime
    env = {"HPCIMAGE_IMAGE": str(store.dir / "Other-1.sqfs"), "HPCIMAGE_MODULE": "Other/1"}
    ok(store.update(env=env))
    assert sha(store.local / "Other-1.sqfs") == sha(demo_sif)
    assert store.chosen(env=env) == str(store.local / "Other-1.sqfs")


def test_publish_build_date_is_iso_utc_from_the_file(store, tmp_path):
    """The manifest's build_date is ISO 8601 UTC, read from the file (SquashFS
    superblock, SIF header), never the free-text label: Apptainer writes
    org.label-schema.build-date as 'Friday_14_June_2019_16:49:57_PDT'."""
    root = tmp_path / "root"
    (root / ".singularity.d").mkdir(parents=True)
    (root / ".singularity.d" / "labels.json").write_text(json.dumps(
        {"org.label-schema.build-date": "Friday_14_June_2019_16:49:57_PDT"}))
    sqfs = tmp_path / "dated.sqfs"
    subprocess.run(["mksquashfs", str(root), str(sqfs), "-noappend", "-quiet", "-no-progress",
                    "-all-root", "-mkfs-time", "1732699920"], check=True,
                   stdout=subprocess.DEVNULL)
    store.publish(sqfs)
    cur = store.manifest()["images"]["Demo-1.0.sqfs"]["current"]
    assert cur["build_date"] == "2024-11-27T09:32:00Z"
    sif = tmp_path / "dated.sif"
    before = time.time()
    subprocess.run(cli_argv("build", str(sif), str(root)), check=True,
                   stdout=subprocess.DEVNULL)
    store.publish(sif, "Other", "1")
    date = store.manifest()["images"]["Other-1.sqfs"]["current"]["build_date"]
    made = calendar.timegm(time.strptime(date, "%Y-%m-%dT%H:%M:%SZ"))
    assert int(before) - 1 <= made <= time.time() + 1, date       # the SIF header's time


def test_publish_unlisted_image_is_refused(store, v1):
    r = store.publish(v1, "Ubuntu", "16.04", ok=False)
    one_error(r, 2, "hpcimage", "Ubuntu/16.04 is not in", "its images: Demo/1.0, Other/1",
              "add it there")
    assert not store.dir.exists()


@pytest.mark.parametrize("what, status, needle", [
    ("missing", 2, "no such file"),
    ("directory", 2, "is a directory: publish takes an image file"),
    ("not-an-image", 2, "not an image"),
    ("definition", 2, "--definition"),
    ("store-blocked", 1, "a file is in the way"),
])
def test_publish_errors(store, v1, demo_dir, tmp_path, what, status, needle):
    src, more = v1, []
    if what == "missing":
        src = tmp_path / "nope.sqfs"
    elif what == "directory":
        src = demo_dir
    elif what == "not-an-image":
        src = tmp_path / "x.sqfs"
        src.write_bytes(b"\0" * 4096)
    elif what == "definition":
        more = ["--definition", str(tmp_path / "missing.def")]
    elif what == "store-blocked":
        store.dir.write_text("a file where the store should be\n")
    r = store.publish(src, "Demo", "1.0", *more, ok=False)
    one_error(r, status, "hpcimage", needle)
    if what != "store-blocked":
        assert not store.dir.exists()


def test_publish_store_errors(store, v1, userdir):
    store.dir.mkdir()
    # a directory where the image goes
    store.image.mkdir()
    one_error(store.publish(v1, ok=False), 1, "hpcimage", "exists and is not a regular file")
    store.image.rmdir()
    # a manifest that is not one
    (store.dir / "hpcimage-manifest.json").write_text("{broken\n")
    one_error(store.publish(v1, ok=False), 1, "hpcimage", "cannot read the manifest",
              "not valid JSON")
    (store.dir / "hpcimage-manifest.json").write_text('{"images": []}\n')
    one_error(store.publish(v1, ok=False), 1, "hpcimage", "not an hpcimage manifest")
    assert not store.image.exists() and store.temps() == []


def test_publish_full_store(store, big_a, userdir):
    mnt = store.dir
    _tmpfs(mnt, "8m")
    try:
        r = store.publish(big_a, ok=False)
        one_error(r, 1, "hpcimage", f"no space left in {store.dir}", "nothing was changed")
        assert sorted(p.name for p in mnt.iterdir()) == [".hpcimage.lock"]
    finally:
        _umount(mnt)


def test_publish_bad_site_yaml(store, v1):
    store.site.write_text("store: s\nimages: []\nkeep: -3\n")
    one_error(store.publish(v1, ok=False), 2, "hpcimage", "keep: must be 0 or more")


def test_publish_keeps_previous_versions(store, v1, v2, bare_sqfs):
    store.write_site(keep=1)
    store.publish(v1)
    store.publish(v2)
    rec = store.manifest()["images"]["Demo-1.0.sqfs"]
    assert rec["current"]["sha256"] == sha(v2)
    assert [e["sha256"] for e in rec["previous"]] == [sha(v1)]
    prev = store.dir / rec["previous"][0]["file"]
    assert prev.parent.name == ".hpcimage-previous" and sha(prev) == sha(v1)
    store.publish(bare_sqfs)
    rec = store.manifest()["images"]["Demo-1.0.sqfs"]
    assert [e["sha256"] for e in rec["previous"]] == [sha(v2)]           # keep: 1
    assert sorted(p.name for p in (store.dir / ".hpcimage-previous").iterdir()) == [
        Path(rec["previous"][0]["file"]).name]
    # back to v1: it becomes current again, v3 (bare) previous
    store.write_site(keep=0)
    store.publish(v1)
    rec = store.manifest()["images"]["Demo-1.0.sqfs"]
    assert rec["current"]["sha256"] == sha(v1) and rec["previous"] == []
    assert list((store.dir / ".hpcimage-previous").iterdir()) == []
    assert store.temps() == []


def test_publish_same_content_changes_nothing(store, v1):
    store.publish(v1)
    before = (store.dir / "hpcimage-manifest.json").stat().st_mtime_ns, store.image.stat().st_ino
    r = store.publish(v1)
    assert "nothing changed" in r.stdout
    assert ((store.dir / "hpcimage-manifest.json").stat().st_mtime_ns,
            store.image.stat().st_ino) == before


def test_publish_records_an_image_built_in_place(store, v1, v2):
    store.dir.mkdir()
    other = store.dir / "Other-1.sqfs"
    shutil.copyfile(v1, other)
    ino = other.stat().st_ino
    r = store.publish(other, "Other", "1")
    assert "publish: Other/1 -> " in r.stdout
    cur = store.manifest()["images"]["Other-1.sqfs"]["current"]
    assert cur["sha256"] == sha(v1) and other.stat().st_ino == ino     # not copied
    assert cur["size"] == other.stat().st_size


def test_publish_over_an_image_placed_by_hand(store, v1, v2):
    """The file already there (never published) becomes a previous version."""
    store.dir.mkdir()
    shutil.copyfile(v1, store.image)
    store.publish(v2)
    rec = store.manifest()["images"]["Demo-1.0.sqfs"]
    assert rec["current"]["sha256"] == sha(v2)
    assert [e["sha256"] for e in rec["previous"]] == [sha(v1)]
    assert sha(store.dir / rec["previous"][0]["file"]) == sha(v1)


# --------------------------------------------------------------------------
# hpcimage build --all: builds beside the store, then publishes
# --------------------------------------------------------------------------

DEMO_DEF = Path(__file__).resolve().parent.parent / "images" / "Demo.def"


def _site_def(store, marker):
    """images/Demo.def beside the store's site.yaml, whose image says MARKER."""
    (store.top / "images").mkdir(exist_ok=True)
    d = store.top / "images" / "Demo.def"
    d.write_text(DEMO_DEF.read_text().replace(
        "%post\n", f"%post\n    echo {marker} > /hpcimage-version\n", 1))
    return d


def _build_all(store, *args):
    return subprocess.run(cli_argv("build", "--all", "--site", str(store.site), *args),
                          capture_output=True, text=True, cwd="/")


def test_build_all_publishes_a_rebuild(store, userdir):
    """A rebuild with --force goes through publish: users with a copy are told of the
    update, the replaced image is kept, users without a copy get the new file verified."""
    d = _site_def(store, "one")
    r = _build_all(store, "Demo/1.0")
    assert r.returncode == 0 and "built 1, skipped 0, failed 0" in r.stderr, r.stderr
    first = store.manifest()["images"]["Demo-1.0.sqfs"]["current"]
    assert first["sha256"] == sha(store.image)
    assert first["definition_sha256"] == hashlib.sha256(d.read_bytes()).hexdigest()
    subprocess.run(["chmod", "-R", "a+rX", str(store.dir)], check=True)
    ok(store.update())
    assert store.update("--check").returncode == 0

    _site_def(store, "two")
    r = _build_all(store, "--force", "Demo")
    assert r.returncode == 0 and "built 1, skipped 0, failed 0" in r.stderr, r.stderr
    subprocess.run(["chmod", "-R", "a+rX", str(store.dir)], check=True)
    rec = store.manifest()["images"]["Demo-1.0.sqfs"]
    assert rec["current"]["sha256"] == sha(store.image) != first["sha256"]
    r = store.update("--check")
    assert r.returncode == 1 and "an update is available" in r.stdout, (r.stdout, r.stderr)
    # the replaced image is kept as a previous version
    assert [e["sha256"] for e in rec["previous"]] == [first["sha256"]]
    assert sha(store.dir / rec["previous"][0]["file"]) == first["sha256"]
    # nothing of the build is left beside the store
    assert sorted(p.name for p in store.dir.iterdir()) == [
        ".hpcimage-previous", ".hpcimage.lock", "Demo-1.0.sqfs", "hpcimage-manifest.json"]
    # a user without a local copy gets the new image, verified
    fresh = userdir / "fresh"
    ok(store.update(env={"HPCIMAGE_LOCAL": str(fresh)}))
    assert sha(fresh / "Demo-1.0.sqfs") == rec["current"]["sha256"]
    r = store.run_image("cat", "/hpcimage-version", env={"HPCIMAGE_LOCAL": str(fresh)})
    assert r.returncode == 0 and r.stdout == "two\n", (r.stdout, r.stderr)
    ok(store.update())
    r = store.run_image("cat", "/hpcimage-version")
    assert r.stdout == "two\n", (r.stdout, r.stderr)


def test_build_all_unknown_name_is_bad_input(store):
    _site_def(store, "one")
    one_error(_build_all(store, "Nope"), 2, "hpcimage", "Nope", "not an image of",
              "Demo/1.0, Other/1")
    one_error(_build_all(store, "Demo/2.0"), 2, "hpcimage", "Demo/2.0")
    assert not store.dir.exists()          # nothing built, nothing written


def test_build_all_failure_leaves_the_store_alone(store, v1):
    store.publish(v1)
    before = store.manifest(), sha(store.image)
    (store.top / "images").mkdir()
    (store.top / "images" / "Demo.def").write_text("Bootstrap: busybox\n%post\n    false\n")
    r = _build_all(store, "--force", "Demo")
    assert r.returncode == 1 and "failed 1 (Demo/1.0)" in r.stderr, r.stderr
    assert (store.manifest(), sha(store.image)) == before
    assert not [p for p in store.dir.iterdir() if p.name.startswith(".hpcimage-build.")]


def test_build_into_the_store_is_refused(store, v1, tmp_path):
    """A plain build never writes over a store's file behind the manifest."""
    store.publish(v1)
    before = sha(store.image)
    r = subprocess.run(cli_argv("build", "--force", str(store.image), str(DEMO_DEF)),
                       capture_output=True, text=True, cwd="/")
    one_error(r, 2, "hpcimage", "is an image store", "hpcimage publish")
    r = subprocess.run(cli_argv("build", str(store.dir / "New.sqfs"), str(v1)),
                       capture_output=True, text=True, cwd="/")
    one_error(r, 2, "hpcimage", "is an image store")
    assert sha(store.image) == before and not (store.dir / "New.sqfs").exists()


def test_concurrent_publishes_share_one_manifest(store, v1, v2):
    procs = [subprocess.Popen(cli_argv("publish", str(src), "--name", n, "--version", v,
                                       "--site", str(store.site)),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for src, n, v in ((v1, "Demo", "1.0"), (v2, "Other", "1"))]
    for p in procs:
        out, err = p.communicate(timeout=60)
        assert p.returncode == 0, err
    images = store.manifest()["images"]
    assert images["Demo-1.0.sqfs"]["current"]["sha256"] == sha(v1)
    assert images["Other-1.sqfs"]["current"]["sha256"] == sha(v2)


def test_readers_never_see_a_half_written_manifest_or_image(store, v1, v2):
    store.publish(v1)
    digests = {sha(v1), sha(v2)}
    stop = threading.Event()
    seen = []

    def reader():
        while not stop.is_set():
            m = json.loads((store.dir / "hpcimage-manifest.json").read_text())
            seen.append(m["images"]["Demo-1.0.sqfs"]["current"]["sha256"])
            with open(store.image, "rb") as f:
                head = f.read(4)
            assert head == b"hsqs"

    t = threading.Thread(target=reader)
    t.start()
    try:
        for i in range(6):
            store.publish(v2 if i % 2 == 0 else v1)
    finally:
        stop.set()
        t.join()
    assert seen and set(seen) <= digests
    assert sha(store.image) in digests


# --------------------------------------------------------------------------
# image-update
# --------------------------------------------------------------------------

def test_update_copies_verifies_and_the_wrappers_use_it(store, v1, v2):
    store.publish(v1)
    assert store.chosen() == str(store.image)                 # no copy yet: the store's
    r = ok(store.update())
    assert r.stdout.startswith(f"Demo/1.0: updated the local copy {store.copy}")
    assert "sha256 verified" in r.stdout and r.stderr == ""
    assert sha(store.copy) == sha(v1)
    st = store.copy.stat()
    assert st.st_uid == store.user.uid and st.st_mode & 0o7777 == 0o644
    assert local.read_state(str(store.local / ".Demo-1.0.sqfs.hpcimage-state"))["sha256"] == sha(v1)
    assert store.chosen() == str(store.copy)
    assert store.run_image("cat", "/hpcimage-version").stdout == "1\n"
    assert store.temps() == []
    # a new version in the store: the wrappers switch to it at once, then to its copy
    store.publish(v2)
    assert store.chosen() == str(store.image)
    assert store.run_image("cat", "/hpcimage-version").stdout == "2\n"
    ok(store.update())
    assert store.chosen() == str(store.copy) and sha(store.copy) == sha(v2)
    assert store.run_image("cat", "/hpcimage-version").stdout == "2\n"


def test_update_when_current_does_not_read_the_image(store, v1):
    store.publish(v1)
    ok(store.update())
    mtime = store.copy.stat().st_mtime_ns
    store.image.chmod(0o600)                  # unreadable to the user: a read would fail
    t = time.monotonic()
    r = ok(store.update())
    assert r.stdout == (f"Demo/1.0: the local copy {store.copy} is up to date (published "
                        f"{store.manifest()['images']['Demo-1.0.sqfs']['current']['published']})\n")
    assert time.monotonic() - t < 5
    assert store.copy.stat().st_mtime_ns == mtime


def test_update_default_local_directory_is_under_home(store, v1, userdir):
    store.publish(v1)
    home = userdir / "home"
    home.mkdir()
    os.chown(home, store.user.uid, store.user.gid)
    r = ok(store.update(env={"HOME": str(home), "HPCIMAGE_LOCAL": None}))
    copy = home / ".hpcimage/images/Demo-1.0.sqfs"
    assert str(copy) in r.stdout and sha(copy) == sha(v1)
    assert store.chosen(env={"HOME": str(home), "HPCIMAGE_LOCAL": None}) == str(copy)
    # the site's `local`, with a $VARIABLE, expanded for the user
    store.write_site(extra="local: $SCRATCH/imgs\n")
    assert json.loads((store.top / "wrappers/site.json").read_text())["local"] == "$SCRATCH/imgs"
    env = {"HPCIMAGE_LOCAL": None, "SCRATCH": str(userdir / "scratch")}
    ok(store.update(env=env))
    assert sha(userdir / "scratch/imgs/Demo-1.0.sqfs") == sha(v1)
    assert store.chosen(env=env) == str(userdir / "scratch/imgs/Demo-1.0.sqfs")
    one_error(store.update(env={"HPCIMAGE_LOCAL": None, "SCRATCH": None}), 2, "image-update",
              "'$SCRATCH/imgs'", "is a variable unset?")


def test_check_exit_statuses(store, v1, v2):
    store.publish(v1)
    r = store.update("--check")
    assert r.returncode == 1 and "no local copy; image-update makes one" in r.stdout
    ok(store.update())
    r = store.update("--check")
    assert r.returncode == 0 and r.stdout == f"Demo/1.0: the local copy {store.copy} is current\n"
    store.publish(v2)
    r = store.update("--check")
    assert r.returncode == 1 and "an update is available" in r.stdout
    store.dir.rename(store.top / "moved")
    one_error(store.update("--check"), 2, "image-update", "the image store is unreachable")
    r = store.update("--check", env={"HPCIMAGE_IMAGE": None})     # the wrapper's own message
    assert r.returncode == 2 and r.stderr.startswith("image-update: no image module loaded")


def test_remove(store, v1):
    store.publish(v1)
    ok(store.update())
    r = ok(store.update("--remove"))
    assert r.stdout == (f"Demo/1.0: removed the local copy {store.copy}; the image-* commands "
                        f"use {store.image}\n")
    assert not store.copy.exists() and not os.path.lexists(
        store.local / ".Demo-1.0.sqfs.hpcimage-state")
    assert store.chosen() == str(store.image)
    assert ok(store.update("--remove")).stdout == f"Demo/1.0: no local copy in {store.local}\n"
    one_error(store.update("--check", "--remove"), 2, "image-update", "exclude each other")


def _update_on_a_terminal(store, columns=None):
    """image-update with its stderr on a pty (of `columns` columns): (status, what the
    terminal received)."""
    return on_terminal(store.user, [str(store.top / "wrappers" / "image-update")],
                       store.env(), columns=columns, timeout=60)


def test_progress_bar_on_a_terminal_only(store, big_a):
    store.publish(big_a)
    status, tty = _update_on_a_terminal(store)
    assert status == 0
    assert "\rimage-update Demo/1.0 [" in tty and "100% " in tty and "MiB/s" in tty, tty
    assert tty.rstrip().endswith("MiB/s\x1b[K"), tty
    ok(store.update("--remove"))
    r = ok(store.update())                    # not a terminal: quiet
    assert r.stderr == "" and r.stdout.count("\n") == 1


@pytest.mark.parametrize("columns", [60, 30])
def test_progress_bar_fits_the_terminal(store, big_a, columns):
    """At 60 (or 30) columns every redraw is \r, at most columns - 1 characters, then
    clear-to-end-of-line: nothing wraps, so no stale line is left behind."""
    store.publish(big_a)
    status, tty = _update_on_a_terminal(store, columns)
    assert status == 0, tty
    assert tty.endswith("\x1b[K\r\n"), repr(tty)        # the pty turns \n into \r\n
    draws = tty[:-len("\x1b[K\r\n")].split("\x1b[K")
    assert len(draws) >= 1
    for d in draws:
        assert d.startswith("\r") and "\n" not in d, repr(d)
        assert len(d) - 1 <= columns - 1, repr(d)
    assert "100%" in draws[-1], repr(draws[-1])


def test_update_errors(store, v1, userdir):
    # no module loaded: the wrapper itself says so
    r = store.update(env={"HPCIMAGE_IMAGE": None})
    assert r.returncode == 2 and r.stderr == (
        "image-update: no image module loaded: run 'module load <Name/version>' first "
        "('module avail' lists the images)\n")
    r = store.user.run(cli_argv("update"), env={"PATH": "/usr/bin:/bin"})
    one_error(r, 2, "hpcimage", "no image module loaded")
    one_error(store.update("--bogus"), 2, "image-update", "no such option: --bogus")
    # not published: a store without a manifest, or one that does not list the image
    store.dir.mkdir()
    one_error(store.update(), 1, "image-update", "is not in the store's manifest",
              "hpcimage publish")
    store.publish(v1, "Other", "1")
    one_error(store.update(), 1, "image-update", "is not in the store's manifest")
    one_error(store.update("--check"), 2, "image-update", "is not in the store's manifest")
    store.publish(v1)
    # a local directory the user cannot write
    one_error(store.update(env={"HPCIMAGE_LOCAL": "/var/lib"}), 1, "image-update",
              "/var/lib", "ermission denied")
    one_error(store.update(env={"HPCIMAGE_LOCAL": "relative/dir"}), 2, "image-update",
              "not an absolute path")
    one_error(store.update(env={"HPCIMAGE_LOCAL": str(store.dir)}), 2, "image-update",
              "is the store's directory")
    one_error(store.update("--remove", env={"HPCIMAGE_LOCAL": str(store.dir) + "/."}), 2,
              "image-update", "is the store's directory")
    blocked = userdir / "file"
    blocked.write_text("x")
    os.chown(blocked, store.user.uid, store.user.gid)
    one_error(store.update(env={"HPCIMAGE_LOCAL": str(blocked / "sub")}), 1, "image-update",
              "cannot create directory")
    # the store's file unreadable for the user
    store.image.chmod(0o600)
    one_error(store.update(), 1, "image-update", f"cannot read {store.image}",
              "Permission denied")
    store.image.chmod(0o644)
    # the store's file changed after it was published (not what the manifest says)
    os.utime(store.image, ns=(0, 10 ** 18))
    one_error(store.update(), 1, "image-update", "is not the file its manifest describes")
    # a manifest that is not one
    (store.dir / "hpcimage-manifest.json").write_text("[1, 2]\n")
    one_error(store.update(), 1, "image-update", "unreadable manifest")
    assert store.temps() == []


def test_wrapper_execs_the_cli(store, tmp_path):
    stub = tmp_path / "python3"
    stub.write_text('#!/bin/sh\nprintf "%s\\0" "$@" > "$STUB_OUT"\n'
                    'printf "%s" "$HPCIMAGE_SITE_CONFIG" > "$STUB_OUT.cfg"\nexit 5\n')
    stub.chmod(0o755)
    out = tmp_path / "argv"
    env = {"PATH": "/usr/bin:/bin", "HPCIMAGE_IMAGE": "/x.sqfs", "HPCIMAGE_PYTHON": str(stub),
           "STUB_OUT": str(out)}
    r = subprocess.run([str(store.top / "wrappers/image-update"), "--check", "a b"], env=env)
    assert r.returncode == 5
    assert out.read_bytes().decode().split("\0")[:-1] == [
        "-I", "-c", wrapper_code("image-update", "hpcimage.cli"), "image-update", "--check",
        "a b"]
    assert Path(str(out) + ".cfg").read_text() == f"{store.top}/wrappers/site.json"


# --------------------------------------------------------------------------
# Concurrency
# --------------------------------------------------------------------------

def test_eight_updates_at_once_make_one_copy(store, big_a, userdir):
    """Ranks of one job and two logins (one through a symlinked path to the same
    directory): one copies, the others wait on the lock and find it current."""
    store.publish(big_a)
    store.local.mkdir()
    os.chown(store.local, store.user.uid, store.user.gid)
    via_link = userdir / "login2"
    os.symlink(store.local, via_link)
    procs = []
    for i in range(8):
        env = store.env(HPCIMAGE_LOCAL=str(store.local if i % 2 else via_link),
                        SLURM_JOB_ID="42", SLURM_PROCID=str(i))
        procs.append(store.user.popen([str(store.top / "wrappers/image-update")], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    results = [p.communicate(timeout=120) + (p.returncode,) for p in procs]
    assert all(rc == 0 for _, _, rc in results), results
    outs = [o for o, _, _ in results]
    assert sum("updated the local copy" in o for o in outs) == 1, outs
    assert sum("is up to date" in o for o in outs) == 7, outs
    assert sha(store.copy) == sha(big_a)
    assert store.temps() == []


# --------------------------------------------------------------------------
# Faults: the old local copy stays intact and usable, nothing is left behind
# --------------------------------------------------------------------------

def _usable(store, version):
    """The local copy runs (as an image of its own) and is that version."""
    r = store.user.run(cli_argv("exec", str(store.copy), "cat", "/hpcimage-version"))
    assert r.returncode == 0 and r.stdout == f"{version}\n", r.stderr


def test_corrupt_store_file(store, v1, v2):
    store.publish(v1)
    ok(store.update())
    store.publish(v2)
    st = store.image.stat()
    with open(store.image, "r+b") as f:          # flip a byte, keep size and mtime
        f.seek(st.st_size // 2)
        b = f.read(1)
        f.seek(st.st_size // 2)
        f.write(bytes([b[0] ^ 0xFF]))
    os.utime(store.image, ns=(st.st_atime_ns, st.st_mtime_ns))
    one_error(store.update(), 1, "image-update", "sha256 mismatch",
                  "the store's file is corrupt", "the local copy is unchanged")
    assert sha(store.copy) == sha(v1)
    _usable(store, "1")
    assert store.temps() == []
    assert store.update("--check").returncode == 1


def _tmpfs(path, size):
    path.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(path)],
                   check=True)


def _umount(path):
    subprocess.run(["umount", "-l", str(path)], check=False)


def test_full_disk(store, v1, v2, userdir):
    """A tmpfs that holds the old copy but not the new one beside it."""
    mnt = userdir / "small"
    size = (v1.stat().st_size + v2.stat().st_size // 2 + 4095) // 4096 * 4096
    _tmpfs(mnt, size)
    try:
        os.chown(mnt, store.user.uid, store.user.gid)
        env = {"HPCIMAGE_LOCAL": str(mnt)}
        store.publish(v1)
        ok(store.update(env=env))
        store.publish(v2)
        # 1. seen before copying (statvfs)
        one_error(store.update(env=env), 1, "image-update", "not enough space in",
                  "the local copy is unchanged")
        assert sha(mnt / "Demo-1.0.sqfs") == sha(v1)
        assert [p.name for p in mnt.iterdir() if "tmp" in p.name] == []
        # 2. the disk fills up while copying (statvfs told a different story)
        code = ("import os, sys\n"
                "real = os.statvfs\n"
                "class Big:\n"
                "    f_bavail = f_frsize = 1 << 40\n"
                "os.statvfs = lambda p: Big()\n"
                "from hpcimage.cli import main\n"
                "main(['image-update'])\n")
        r = store.user.run([PY, "-I", "-c", code], env=store.env(
            HPCIMAGE_LOCAL=str(mnt), HPCIMAGE_SITE_CONFIG=f"{store.top}/wrappers/site.json"))
        one_error(r, 1, "image-update", "no space left in", "the local copy is unchanged")
        assert sha(mnt / "Demo-1.0.sqfs") == sha(v1)
        assert [p.name for p in mnt.iterdir() if "tmp" in p.name] == []
        assert store.chosen(env=env) == str(store.image)        # v2 from the store meanwhile
        store.copy = mnt / "Demo-1.0.sqfs"
        _usable(store, "1")
    finally:
        _umount(mnt)


def test_kill_during_copy_leaves_old_or_new(store, big_a, big_b):
    """kill -9 at random points of image-update (at least 20 times): the local file is
    always the old or the new image, whole; the wrappers' choice is always an image that
    is whole and what it claims; the next run removes the leftovers."""
    digests = {sha(big_a): big_a, sha(big_b): big_b}
    store.publish(big_a)
    t = time.monotonic()
    ok(store.update())
    full = time.monotonic() - t
    rnd = random.Random(os.environ.get("HPCIMAGE_KILL_SEED", "6"))
    trials = int(os.environ.get("HPCIMAGE_KILL_TRIALS", "24"))
    outcomes = {"old": 0, "new": 0, "mid-copy": 0}
    current = big_a
    for i in range(trials):
        nxt = big_b if current == big_a else big_a
        store.publish(nxt)
        p = store.user.popen([str(store.top / "wrappers/image-update")], env=store.env(),
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        ours = store.local / f".Demo-1.0.sqfs.hpcimage-tmp.{p.pid}"
        if i % 2:
            time.sleep(rnd.uniform(0, full * 1.5))
        else:                           # aim at the copy itself: after the temp file appears
            deadline = time.monotonic() + 30
            while not ours.exists() and p.poll() is None and time.monotonic() < deadline:
                time.sleep(0.0005)
            time.sleep(rnd.uniform(0, full * 0.6))
        if ours.exists():
            outcomes["mid-copy"] += 1
        os.kill(p.pid, signal.SIGKILL)
        p.wait()
        got = sha(store.copy)
        assert got in digests, f"trial {i}: the local copy is neither image"
        outcomes["new" if digests[got] == nxt else "old"] += 1
        chosen = store.chosen()
        if chosen == str(store.copy):
            assert got == store.manifest()["images"]["Demo-1.0.sqfs"]["current"]["sha256"]
        else:
            assert chosen == str(store.image)
        current = digests[got]
        if current != nxt and i % 3 == 0:
            ok(store.update())          # sometimes finish it, so both directions are tried
            current = nxt
    print("kill outcomes:", outcomes)
    assert outcomes["mid-copy"] >= 5, outcomes
    ok(store.update())
    assert store.temps() == []
    assert store.chosen() == str(store.copy)
    assert sha(store.copy) == store.manifest()["images"]["Demo-1.0.sqfs"]["current"]["sha256"]


def test_leftover_temp_files_are_removed_by_the_next_run(store, v1):
    store.publish(v1)
    store.local.mkdir()
    os.chown(store.local, store.user.uid, store.user.gid)
    for n in (".Demo-1.0.sqfs.hpcimage-tmp.999999", ".Demo-1.0.sqfs.hpcimage-tmp.1.state",
              ".Other-1.sqfs.hpcimage-tmp.5"):
        (store.local / n).write_bytes(b"half")
    ok(store.update())
    assert sorted(p.name for p in store.local.iterdir()) == [
        ".Demo-1.0.sqfs.hpcimage-lock", ".Demo-1.0.sqfs.hpcimage-state",
        ".Other-1.sqfs.hpcimage-tmp.5", "Demo-1.0.sqfs"]
    # and in the store, by the next publish
    (store.dir / ".Demo-1.0.sqfs.hpcimage-tmp.999999").write_bytes(b"half")
    (store.dir / ".hpcimage-manifest.json.hpcimage-tmp.999998").write_bytes(b"{")
    store.publish(v1)
    assert store.temps() == [".Other-1.sqfs.hpcimage-tmp.5"]


def test_local_path_is_a_symlink_pointing_elsewhere(store, v1, userdir):
    store.publish(v1)
    store.local.mkdir()
    os.chown(store.local, store.user.uid, store.user.gid)
    target = userdir / "precious.txt"
    target.write_text("mine\n")
    os.chown(target, store.user.uid, store.user.gid)
    os.symlink(target, store.copy)
    one_error(store.update(), 1, "image-update", f"{store.copy} is a symbolic link",
              str(target), "not written through")
    assert target.read_text() == "mine\n" and store.copy.is_symlink()
    assert store.chosen() == str(store.image)                  # a link is never the copy
    one_error(store.update("--remove"), 1, "image-update", "symbolic link")
    assert store.copy.is_symlink()
    # a link to root's file, and a link where the lock file goes
    store.copy.unlink()
    os.symlink("/etc/shadow", store.copy)
    one_error(store.update(), 1, "image-update", "symbolic link (to /etc/shadow)")
    store.copy.unlink()
    (store.local / ".Demo-1.0.sqfs.hpcimage-lock").unlink()
    os.symlink(target, store.local / ".Demo-1.0.sqfs.hpcimage-lock")
    one_error(store.update(), 1, "image-update", "hpcimage-lock is a symbolic link")
    assert target.read_text() == "mine\n"
    assert store.temps() == []


def test_symlinked_copy_does_not_replace_a_good_one(store, v1, v2, userdir):
    """An old copy, then a symlink put over it: update refuses; after removing the
    link the next update works."""
    store.publish(v1)
    ok(store.update())
    saved = userdir / "saved.sqfs"
    os.rename(store.copy, saved)
    os.symlink(saved, store.copy)
    store.publish(v2)
    one_error(store.update(), 1, "image-update", "symbolic link")
    assert sha(saved) == sha(v1)
    store.copy.unlink()
    ok(store.update())
    assert sha(store.copy) == sha(v2) and sha(saved) == sha(v1)


@pytest.mark.parametrize("how", ["missing", "unreadable"])
def test_store_unreachable(store, v1, how):
    store.publish(v1)
    ok(store.update())
    moved = store.top / "elsewhere"
    if how == "missing":
        store.dir.rename(moved)
    else:
        store.dir.chmod(0o700)
    try:
        one_error(store.update(), 1, "image-update", "the image store is unreachable",
                  f"the local copy {store.copy} stays in use")
        one_error(store.update("--check"), 2, "image-update", "unreachable")
        assert store.chosen() == str(store.copy)
        assert store.run_image("cat", "/hpcimage-version").stdout == "1\n"
        # without a local copy: the same message, nothing else
        ok(store.update("--remove"))
        r = one_error(store.update(), 1, "image-update", "the image store is unreachable")
        assert "stays in use" not in r.stderr
        assert store.temps() == []
    finally:
        if how == "missing":
            moved.rename(store.dir)
        else:
            store.dir.chmod(0o755)


# --------------------------------------------------------------------------
# Pieces, in process
# --------------------------------------------------------------------------

def test_lock_without_locks_warns_and_goes_on(tmp_path, monkeypatch):
    import errno
    import io

    import fcntl

    from hpcimage.store import layout as st
    from hpcimage.errors import HpcimageError

    def no_locks(fd, op):
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    err = io.StringIO()
    monkeypatch.setattr(fcntl, "flock", no_locks)
    with st.Lock(str(tmp_path / "l"), err=err, prog="image-update") as lock:
        assert not lock.locked
    assert err.getvalue() == (f"image-update: warning: cannot lock {tmp_path}/l (No locks "
                              "available): going on without the lock\n")

    def broken(fd, op):
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr(fcntl, "flock", broken)
    with pytest.raises(HpcimageError) as e:
        with st.Lock(str(tmp_path / "l")):
            pass
    assert e.value.message == f"cannot lock {tmp_path}/l: Input/output error"
    # without locks, only the temporary files of dead processes are removed
    (tmp_path / ".X.hpcimage-tmp.999999").write_text("")
    (tmp_path / f".X.hpcimage-tmp.{os.getpid()}").write_text("")
    assert st.clean_temps(str(tmp_path), "X", all_stale=False) == [".X.hpcimage-tmp.999999"]


@pytest.mark.parametrize("size", [0, 1, 5 << 20, 40 << 20 | 3])
def test_copy_hashing(tmp_path, size):
    from hpcimage.store import transfer as st
    from hpcimage.errors import HpcimageError
    src = tmp_path / "src"
    src.write_bytes(random.Random(size).randbytes(size))
    for claimed, good in ((size, True), (size + 1, False)):
        fi = os.open(src, os.O_RDONLY)
        fo = os.open(tmp_path / "dst", os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        try:
            if good:
                assert st.copy_hashing(fi, fo, claimed, chunk=1 << 20) == sha(src)
            else:
                with pytest.raises(HpcimageError, match="the source changed while it was copied"):
                    st.copy_hashing(fi, fo, claimed, chunk=1 << 20)
        finally:
            os.close(fi)
            os.close(fo)
        if good:
            assert sha(tmp_path / "dst") == sha(src)


def test_copy_hashing_write_error(tmp_path):
    """A write error in the writer thread reaches the caller."""
    from hpcimage.store import transfer as st
    src = tmp_path / "src"
    src.write_bytes(b"x" * (9 << 20))
    fi = os.open(src, os.O_RDONLY)
    fo = os.open(src, os.O_RDONLY)                 # not writable: EBADF
    try:
        with pytest.raises(OSError):
            st.copy_hashing(fi, fo, 9 << 20, chunk=1 << 20)
    finally:
        os.close(fi)
        os.close(fo)


def test_atomic_file_keeps_the_old_file_on_failure_and_replaces_it_on_success(tmp_path):
    """fsutil.AtomicFile (streamed writes: registry blobs): an exception in the block
    leaves the old file and no temporary name; a clean block replaces it, mode exact."""
    from hpcimage import fsutil
    path = tmp_path / "f"
    path.write_bytes(b"old")
    with pytest.raises(RuntimeError):
        with fsutil.AtomicFile(str(path)) as f:
            f.write(b"half")
            raise RuntimeError("broken download")
    assert path.read_bytes() == b"old" and os.listdir(tmp_path) == ["f"]
    with fsutil.AtomicFile(str(path), 0o640) as f:
        f.write(b"new")
    assert path.read_bytes() == b"new" and os.listdir(tmp_path) == ["f"]
    assert (path.stat().st_mode & 0o777) == 0o640


def test_atomic_file_in_steps_commit_discard_and_exclusive(tmp_path):
    """fsutil.AtomicFile in steps (the store's publish and image-update): the data is
    durable at the temporary name until commit(); discard() leaves the old file;
    discard() after commit() does nothing; exclusive refuses an existing temporary."""
    from hpcimage import fsutil
    path = tmp_path / "img"
    path.write_bytes(b"old")
    a = fsutil.AtomicFile(str(path), tmp=str(tmp_path / ".img.tmp"), exclusive=True)
    a.open().write(b"new")
    a.sync()
    assert (tmp_path / ".img.tmp").read_bytes() == b"new" and path.read_bytes() == b"old"
    a.discard()
    assert sorted(os.listdir(tmp_path)) == ["img"] and path.read_bytes() == b"old"
    b = fsutil.AtomicFile(str(path), tmp=str(tmp_path / ".img.tmp"), exclusive=True)
    b.open().write(b"newer")
    with pytest.raises(FileExistsError):
        fsutil.AtomicFile(str(path), tmp=str(tmp_path / ".img.tmp"), exclusive=True).open()
    b.commit()
    b.discard()
    assert sorted(os.listdir(tmp_path)) == ["img"] and path.read_bytes() == b"newer"
