"""`hpcimage overlay create` (issue 16), as the test user: the ext3 file checked with
debugfs and e2fsck, --fakeroot owners, --sparse, --create-dir, a partition added to a
SIF (`hpcimage sif list` shows it), and the refusals (one line, exit 2 or 1)."""
import os
import shutil
import struct
import subprocess

import pytest

from conftest import cli_argv, runtime_argv
from hpcimage.image import sif


def create(user, *args, cwd, env=None):
    return user.run(cli_argv("overlay", "create", *args), cwd=str(cwd), env=env)


def one_line_error(r, status, text):
    assert r.returncode == status, (r.stdout, r.stderr)
    assert r.stderr.count("\n") == 1 and text in r.stderr, r.stderr


def ls(img, d="/"):
    """{name: (mode, uid, gid)} of directory d in the ext3 file img (debugfs)."""
    out = subprocess.run(["debugfs", "-R", f"ls -l {d}", str(img)], capture_output=True,
                         text=True, check=True).stdout
    entries = {}
    for ln in out.splitlines():
        f = ln.split()
        if len(f) >= 8:
            entries[f[-1]] = (f[1], int(f[3]), int(f[4]))
    return entries


def fsck_clean(img):
    r = subprocess.run(["e2fsck", "-fn", str(img)], capture_output=True, text=True)
    return r.returncode == 0


def test_overlay_create_ext3(user, userdir):
    r = create(user, "--create-dir", "opt/conda", "--create-dir", "data", "o.img",
               cwd=userdir)
    assert (r.returncode, r.stdout, r.stderr) == (0, "", ""), r.stderr
    img = userdir / "o.img"
    st = img.stat()
    assert st.st_size == 64 << 20 and st.st_uid == user.uid and st.st_mode & 0o777 == 0o600
    assert st.st_blocks * 512 >= 64 << 20            # not sparse: the blocks are there
    top = ls(img)
    assert top["upper"] == ("40755", user.uid, user.gid)
    assert top["work"] == ("40755", user.uid, user.gid)
    assert set(ls(img, "/upper")) >= {"opt", "data"}
    assert ls(img, "/upper/opt")["conda"] == ("40755", user.uid, user.gid)
    assert fsck_clean(img)
    assert [p for p in os.listdir(userdir) if p != "o.img"] == []     # no temporary left


def test_overlay_create_fakeroot_sparse(user, userdir):
    r = create(user, "--fakeroot", "--sparse", "--size", "200", "f.img", cwd=userdir)
    assert r.returncode == 0, r.stderr
    img = userdir / "f.img"
    assert img.stat().st_size == 200 << 20
    assert img.stat().st_blocks * 512 < 64 << 20
    top = ls(img)
    assert top["upper"] == ("40755", 0, 0) and top["work"] == ("40755", 0, 0)
    assert fsck_clean(img)
    r = create(user, "-f", "-s", "64", "g.img", cwd=userdir)
    assert r.returncode == 0 and ls(userdir / "g.img")["upper"][1:] == (0, 0)
    # -S: Apptainer's short form of --sparse
    r = create(user, "-S", "-s", "128", "h.img", cwd=userdir)
    assert r.returncode == 0, r.stderr
    assert (userdir / "h.img").stat().st_blocks * 512 < 64 << 20


def test_overlay_create_dir_absolute_is_below_upper(user, userdir):
    """--create-dir /opt/x (as Apptainer's, joined onto upper/) and a/../b."""
    r = create(user, "--create-dir", "/opt/x", "--create-dir", "a/../b", "o.img",
               cwd=userdir)
    assert (r.returncode, r.stderr) == (0, ""), r.stderr
    img = userdir / "o.img"
    assert ls(img, "/upper/opt")["x"] == ("40755", user.uid, user.gid)
    assert "b" in ls(img, "/upper") and "a" not in ls(img, "/upper")
    assert fsck_clean(img)


def test_overlay_create_refusals(user, userdir):
    (userdir / "exists.img").write_text("x")
    os.chown(userdir / "exists.img", user.uid, user.gid)
    one_line_error(create(user, "exists.img", cwd=userdir), 2,
                   "hpcimage: error: overlay create: exists.img exists")
    assert (userdir / "exists.img").read_text() == "x"
    one_line_error(create(user, "--size", "63", "a.img", cwd=userdir), 2,
                   "overlay create: --size 63: an overlay needs at least 64 MiB")
    one_line_error(create(user, "--size", "big", "a.img", cwd=userdir), 2,
                   "overlay create: --size 'big': want a number of MiB")
    for bad in ("../x", "/a/../../x", "/"):
        one_line_error(create(user, "--create-dir", bad, "a.img", cwd=userdir), 2,
                       f"--create-dir {bad!r}: not a directory below upper/")
    one_line_error(create(user, "no/such/dir/a.img", cwd=userdir), 2, "no such directory")
    # no mkfs.ext3 on PATH nor in the sbin directories: a private mount namespace hides it
    r = subprocess.run(["unshare", "-m", "sh", "-c",
                        "mount --bind /dev/null /usr/sbin/mkfs.ext3 && "
                        "mount --bind /dev/null /sbin/mkfs.ext3 2>/dev/null; "
                        f"exec setpriv --reuid={user.uid} --regid={user.gid} --clear-groups "
                        + " ".join(cli_argv("overlay", "create", "a.img"))],
                       cwd=str(userdir), env=user.env(), capture_output=True, text=True)
    one_line_error(r, 1, "overlay create: mkfs.ext3 not found (install e2fsprogs)")
    assert sorted(os.listdir(userdir)) == ["exists.img"]


@pytest.fixture
def sif_copy(user, userdir, demo_sif):
    p = userdir / "d.sif"
    shutil.copy(demo_sif, p)
    os.chown(p, user.uid, user.gid)
    return p


def test_overlay_create_adds_a_sif_partition(user, userdir, sif_copy):
    before = sif_copy.read_bytes()
    r = create(user, "--size", "64", "d.sif", cwd=userdir)
    assert r.returncode == 0, r.stderr
    img = sif.SifImage.open(sif_copy)
    over = [d for d in img.descriptors if d.parttype == sif.PART_OVERLAY]
    assert len(over) == 1 and over[0].fstype == sif.FS_EXT3 and over[0].size == 64 << 20
    assert over[0].offset % 4096 == 0
    listing = user.run(cli_argv("sif", "list", str(sif_copy))).stdout
    assert "FS (Ext3/Overlay/amd64)" in listing
    # the image itself is untouched: the SquashFS partition still reads the same
    prim = img.primary_partition()
    data = sif_copy.read_bytes()
    assert data[prim.offset:prim.end] == before[prim.offset:prim.end]
    part = userdir / "part.ext3"
    part.write_bytes(data[over[0].offset:over[0].end])
    assert ls(part)["upper"][1:] == (user.uid, user.gid) and fsck_clean(part)
    one_line_error(create(user, "d.sif", cwd=userdir), 2,
                   f"already has an ext3 overlay partition (object {over[0].id})")


def _patch_descriptor(path, pick, patch):
    img = sif.SifImage.open(path)
    d = next(d for d in img.descriptors if pick(d))
    off = img.header.descriptors_offset + d.index * sif.DESCRIPTOR_SIZE
    with open(path, "r+b") as f:
        patch(f, off)


def test_overlay_create_refuses_signed_and_encrypted_sif(user, userdir, sif_copy):
    enc = userdir / "e.sif"
    shutil.copy(sif_copy, enc)
    # a signature object: the labels descriptor retyped
    _patch_descriptor(sif_copy, lambda d: d.data_type == sif.DATA_LABELS,
                      lambda f, off: (f.seek(off), f.write(struct.pack("<i",
                                                                       sif.DATA_SIGNATURE))))
    before = sif_copy.read_bytes()
    one_line_error(create(user, "d.sif", cwd=userdir), 2,
                   "overlay create: d.sif is a signed SIF: adding an overlay partition "
                   "would break its signature")
    assert sif_copy.read_bytes() == before
    # an encrypted root file system: the primary partition's fstype
    extra = struct.calcsize("<i?III7q128s")
    _patch_descriptor(enc, lambda d: d.is_primary_partition,
                      lambda f, off: (f.seek(off + extra),
                                      f.write(struct.pack("<i", sif.FS_ENCRYPTED_SQUASH))))
    os.chown(enc, user.uid, user.gid)
    one_line_error(create(user, "e.sif", cwd=userdir), 2,
                   "overlay create: e.sif is an encrypted SIF")
    os.chmod(enc, 0o444)
    one_line_error(create(user, "e.sif", cwd=userdir), 2, "you cannot write this SIF image")


def test_overlay_create_refuses_a_gocryptfs_encrypted_sif(user, userdir, sif_copy):
    """The passphrase kind (fs type 6, no crypto message) is encrypted too: an overlay
    partition would take the container's writes in clear."""
    extra = struct.calcsize("<i?III7q128s")
    _patch_descriptor(sif_copy, lambda d: d.is_primary_partition,
                      lambda f, off: (f.seek(off + extra),
                                      f.write(struct.pack("<i", sif.FS_GOCRYPTFS_SQUASH))))
    before = sif_copy.read_bytes()
    one_line_error(create(user, "d.sif", cwd=userdir), 2,
                   "overlay create: d.sif is an encrypted SIF")
    assert sif_copy.read_bytes() == before


# ------------------------------------------------------- site.yaml personal_overlay

def _site(userdir, demo_sqfs, overlay):
    """A site whose module Demo/1.0 (the Demo SquashFS) has personal_overlay: overlay,
    rendered into userdir; the environment a loaded module gives the wrappers."""
    store = userdir / "store"
    store.mkdir()
    shutil.copy(demo_sqfs, store / "demo.sqfs")
    site = userdir / "site.yaml"
    site.write_text(f"store: {store}\nimages:\n  - name: Demo\n    version: \"1.0\"\n"
                    f"    file: demo.sqfs\n    personal_overlay: {overlay}\n")
    r = subprocess.run(cli_argv("generate", "--site", str(site)), capture_output=True,
                       text=True)
    assert r.returncode == 0, r.stderr
    subprocess.run(["chmod", "-R", "a+rX", str(userdir)], check=True)
    return {"HPCIMAGE_IMAGE": str(store / "demo.sqfs"), "HPCIMAGE_MODULE": "Demo/1.0",
            "HPCIMAGE_SITE_CONFIG": str(userdir / "wrappers" / "site.json"),
            "HPCIMAGE_LOCAL": str(userdir / "local")}


def test_personal_overlay_made_on_first_use(user, userdir, demo_sqfs):
    env = _site(userdir, demo_sqfs, "{size: 80, sparse: false}")
    (userdir / "local").mkdir()
    os.chown(userdir / "local", user.uid, user.gid)
    import json
    policy = json.loads((userdir / "wrappers" / "site.json").read_text())
    assert policy["personal_overlays"] == {"Demo/1.0": {"size": 80, "sparse": False}}
    r = user.run(runtime_argv("image-exec", "true"), env=env, cwd="/")
    assert (r.returncode, r.stderr) == (0, ""), r.stderr
    img = userdir / "local" / "overlay-Demo-1.0.img"
    st = img.stat()
    assert st.st_size == 80 << 20 and st.st_uid == user.uid
    assert ls(img)["upper"][1:] == (user.uid, user.gid) and fsck_clean(img)
    # the next launch uses the same file; `hpcimage exec` (no module) makes none
    r = user.run(runtime_argv("image-exec", "true"), env=env, cwd="/")
    assert r.returncode == 0 and img.stat().st_ino == st.st_ino
    assert sorted(os.listdir(userdir / "local")) == ["overlay-Demo-1.0.img"]


def test_personal_overlay_cannot_be_made(user, userdir, demo_sqfs):
    env = _site(userdir, demo_sqfs, "true")
    r = user.run(runtime_argv("image-exec", "true"), env=dict(env, HPCIMAGE_LOCAL="/proc/x"),
                 cwd="/")
    one_line_error(r, 1, "image-exec: error: personal overlay of Demo/1.0: /proc/x: ")


def test_personal_overlay_site_errors(userdir):
    from hpcimage.config import site
    from hpcimage.errors import UsageError
    base = "store: /s\nimages:\n  - name: A\n    version: \"1\"\n    file: a.sqfs\n"
    assert site.loads(base + "    personal_overlay: true\n").images[0].personal_overlay \
        == (1024, True)
    assert site.loads(base + "    personal_overlay: false\n").policy().get(
        "personal_overlays") is None
    for bad, msg in (("{size: 10}", "personal_overlay.size: must be at least 64 (MiB)"),
                     ("{siz: 100}", "personal_overlay.siz: unknown key"),
                     ("yes please", "personal_overlay: expected true or false")):
        with pytest.raises(UsageError) as e:
            site.loads(base + f"    personal_overlay: {bad}\n")
        assert msg in str(e.value.message)


def _local(user, userdir):
    (userdir / "local").mkdir()
    os.chown(userdir / "local", user.uid, user.gid)


def test_personal_overlay_is_used_by_every_wrapper(user, userdir, demo_sqfs):
    """image-shell and --fakeroot write the personal overlay; every other call sees it
    read-only (the image's /opt is root's: only --fakeroot writes it, docs/overlays.md)."""
    env = _site(userdir, demo_sqfs, "true")
    _local(user, userdir)
    r = user.run(runtime_argv("image-shell", "-c", "echo kept > /mine"),
                 env=env, cwd="/")
    assert (r.returncode, r.stderr) == (0, ""), r.stderr
    r = user.run(runtime_argv("image-exec", "--fakeroot", "sh", "-c",
                              "echo root > /opt/mine"), env=env,
                 cwd="/")
    assert r.returncode == 0, r.stderr
    r = user.run(runtime_argv("image-exec", "cat", "/mine", "/opt/mine"), env=env, cwd="/")
    assert (r.returncode, r.stdout) == (0, "kept\nroot\n"), r.stderr
    r = user.run(runtime_argv("image-exec", "sh", "-c", "echo x > /other"), env=env,
                 cwd="/")
    assert r.returncode != 0 and "Read-only file system" in r.stderr
    r = user.run(runtime_argv("image-shell", "-c", "cat /other"), env=env, cwd="/")
    assert r.returncode != 0


def test_personal_overlay_below_the_users_writable_layers(user, userdir, demo_sqfs):
    """A writable -o DIR and --writable-tmpfs take the writes (with --fakeroot too); the
    personal overlay is read-only below them, unchanged afterwards."""
    env = _site(userdir, demo_sqfs, "true")
    _local(user, userdir)
    assert user.run(runtime_argv("image-shell", "-c", "echo p > /mine"),
                    env=env, cwd="/").returncode == 0
    dirs = []
    for n in range(2):
        dirs.append(userdir / f"ov{n}")
        dirs[-1].mkdir()
        os.chown(dirs[-1], user.uid, user.gid)
    for args in (("-o", str(dirs[0])), ("--fakeroot", "-o", str(dirs[1])),
                 ("--fakeroot", "--writable-tmpfs")):
        r = user.run(runtime_argv("image-exec", *args, "sh", "-c",
                                  "cat /mine && echo new > /mine && cat /mine"),
                     env=env, cwd="/")
        assert (r.returncode, r.stdout, r.stderr) == (0, "p\nnew\n", ""), r.stderr
        r = user.run(runtime_argv("image-exec", "cat", "/mine"), env=env, cwd="/")
        assert (r.returncode, r.stdout) == (0, "p\n"), r.stderr
    assert [(d / "upper" / "mine").read_text() for d in dirs] == ["new\n"] * 2


def test_personal_overlay_many_readers_one_writer(user, userdir, demo_sqfs):
    """Read-only uses share the personal overlay (a job array, a second terminal); an
    open image-shell keeps them out with one line, and a second writer too."""
    import time
    env = _site(userdir, demo_sqfs, "true")
    _local(user, userdir)
    img = userdir / "local" / "overlay-Demo-1.0.img"
    first = user.popen(runtime_argv("image-exec", "sh", "-c", "echo up; sleep 20"),
                       env=env, cwd="/", stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert first.stdout.readline() == b"up\n"
        r = user.run(runtime_argv("image-exec", "true"), env=env, cwd="/")
        assert (r.returncode, r.stderr) == (0, ""), r.stderr
        one_line_error(user.run(runtime_argv("image-shell", "-c", "true"), env=env,
                                cwd="/"), 1,
                       f"image-shell: error: your personal overlay {img} is in use by "
                       "another container: exit it first")
    finally:
        first.kill()
        first.wait()
    time.sleep(0.5)
    shell = user.popen(runtime_argv("image-shell", "-c", "echo up; sleep 20"), env=env,
                       cwd="/", stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert shell.stdout.readline() == b"up\n"
        one_line_error(user.run(runtime_argv("image-exec", "true"), env=env, cwd="/"), 1,
                       f"image-exec: error: your personal overlay {img} is open for "
                       "writing by another container (image-shell?): exit it first")
    finally:
        shell.kill()
        shell.wait()

