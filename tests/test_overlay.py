"""Overlays (issue 16), as the test user: --overlay with a directory, an ext3 image, a
SquashFS file and a SIF's overlay partition (--writable), --writable-tmpfs and its size,
persistence across runs, deleting and renaming image directories, a second writer
refused, fuse-overlayfs forced, kill -9 during a write, bind targets kept out of the
user's layer, the errors (one line, documented status). docs/overlays.md."""
import os
import shutil
import signal
import subprocess
import time

import pytest

from conftest import cli_argv, runtime_argv, wait_no_leaks
from hpcimage.image import overlay as ovl
from hpcimage.image import sif


def run(user, image, *cmd, opts=(), env=None, cwd=None):
    return user.run(runtime_argv("exec", *opts, str(image), *cmd), env=env, cwd=cwd)


def one_line_error(r, status, text):
    assert r.returncode == status, (r.returncode, r.stdout, r.stderr)
    assert r.stderr.count("\n") == 1 and text in r.stderr, r.stderr


def mkdir_as(user, path):
    path.mkdir(parents=True, exist_ok=True)
    os.chown(path, user.uid, user.gid)
    return path


def make_ext3(user, path, size="32M", layout=True, owner=True):
    """An ext3 overlay image as `overlay create` makes one (upper/, work/ inside, the
    root the user's), with mkfs.ext3 -d."""
    tree = path.parent / (path.name + ".tree")
    tree.mkdir()
    if layout:
        (tree / "upper").mkdir()
        (tree / "work").mkdir()
        for d in (tree, tree / "upper", tree / "work"):
            os.chown(d, user.uid, user.gid)
    argv = ["mkfs.ext3", "-q", "-F", "-d", str(tree)]
    if owner:
        argv += ["-E", f"root_owner={user.uid}:{user.gid}"]
    subprocess.run(argv + [str(path), size], check=True, capture_output=True)
    shutil.rmtree(tree)
    os.chown(path, user.uid, user.gid)
    return path


def add_overlay_partition(sif_path, ext3_path):
    """Append ext3_path to the SIF as its overlay partition (Ext3, Overlay), as
    `apptainer overlay create` does to a SIF: a free descriptor, the data aligned."""
    data = ext3_path.read_bytes()
    with open(sif_path, "r+b") as f:
        h = list(sif._HEADER.unpack(f.read(sif.HEADER_SIZE)))
        end = os.path.getsize(sif_path)
        start = -(-end // sif.PARTITION_ALIGNMENT) * sif.PARTITION_ALIGNMENT
        ids, free = [], None
        for i in range(h[8]):
            f.seek(h[9] + i * sif.DESCRIPTOR_SIZE)
            d = sif._DESCRIPTOR.unpack(f.read(sif.DESCRIPTOR_SIZE))
            if d[1]:
                ids.append(d[2])
            elif free is None:
                free = i
        now = int(time.time())
        desc = sif._DESCRIPTOR.pack(
            sif.DATA_PARTITION, True, max(ids) + 1, sif.GROUP_MASK | 1, 0, start, len(data),
            start - end + len(data), now, now, 0, 0, b"",
            sif._PARTITION.pack(sif.FS_EXT3, sif.PART_OVERLAY, h[3]))
        f.seek(h[9] + free * sif.DESCRIPTOR_SIZE)
        f.write(desc)
        f.seek(start)
        f.write(data)
        h[7] -= 1
        h[12] = start + len(data) - h[11]
        f.seek(0)
        f.write(sif._HEADER.pack(*h))


def root_fstype(user, image, opts, env=None):
    r = run(user, image, "sh", "-c", "grep ' / ' /proc/mounts", opts=opts, env=env)
    assert r.returncode == 0, r.stderr
    return r.stdout.split()[2]


# ------------------------------------------------------------ directories

def test_directory_overlay_persists(user, image, userdir):
    o = mkdir_as(user, userdir / "ov")
    r = run(user, image, "sh", "-c", "echo one > /made-here && mkdir -p /newdir/sub && "
            "echo two > /newdir/sub/f && cat /made-here", opts=("--overlay", str(o)))
    assert (r.returncode, r.stdout) == (0, "one\n"), r.stderr
    assert (o / "upper" / "made-here").read_text() == "one\n"
    assert (o / "work").is_dir()
    # the next run sees it; read-only too, where a write fails
    r = run(user, image, "cat", "/made-here", "/newdir/sub/f", opts=("--overlay", f"{o}:ro"))
    assert (r.returncode, r.stdout) == (0, "one\ntwo\n"), r.stderr
    r = run(user, image, "sh", "-c", "echo x > /other", opts=("--overlay", f"{o}:ro"))
    assert r.returncode != 0 and not (o / "upper" / "other").exists()
    # the bind targets the image lacks (home, the current directory) are not in it
    assert not (o / "upper" / "home").exists() and not (o / "upper" / "tmp").exists()
    assert sorted(os.listdir(o / "upper")) == ["made-here", "newdir"]


def test_overlay_from_the_variables_and_wrapper_forms(user, demo_sqfs, userdir):
    a, b = mkdir_as(user, userdir / "a"), mkdir_as(user, userdir / "b")
    (a / "from-a").write_text("a\n")          # a read-only directory without upper/
    r = run(user, demo_sqfs, "sh", "-c", "cat /from-a; echo w > /w",
            env={"APPTAINER_OVERLAY": f"{a}:ro,{b}"})
    assert (r.returncode, r.stdout) == (0, "a\n"), r.stderr
    assert (b / "upper" / "w").read_text() == "w\n"
    r = run(user, demo_sqfs, "cat", "/w", opts=("-o", f"{b}:ro"))
    assert (r.returncode, r.stdout) == (0, "w\n"), r.stderr


def test_delete_and_rename_image_dirs(user, demo_dir, userdir):
    """In a sandbox the user owns: deleting image directories and files works (and
    persists); renaming a directory of the image: rename(2) fails with EXDEV (overlayfs
    without redirect_dir), `mv` copies instead (docs/overlays.md)."""
    img = userdir / "sandbox"
    shutil.copytree(demo_dir, img, symlinks=True)
    subprocess.run(["chown", "-R", f"{user.uid}:{user.gid}", str(img)], check=True)
    o = mkdir_as(user, userdir / "ov")
    r = run(user, img, "sh", "-c", "rm -rf /opt /etc/os-release && mv /root /root2 && ls /",
            opts=("--overlay", str(o)))
    assert r.returncode == 0, r.stderr
    names = r.stdout.split()
    assert "opt" not in names and "root2" in names and "root" not in names
    r = run(user, img, "sh", "-c", "ls /; test -e /etc/os-release || echo gone",
            opts=("--overlay", f"{o}:ro"))
    assert "opt" not in r.stdout.split() and "gone" in r.stdout, r.stderr
    assert (img / "opt").is_dir() and (img / "root").is_dir()     # the image is as it was


def test_rename_exdev_and_root_owned_dirs(user, debian_sqfs, userdir):
    """Debian: rename(2) of a directory from a lower layer fails with EXDEV (here one the
    user owns, in a read-only overlay); the image's root-owned directories cannot be
    written without --fakeroot (EACCES, or EOVERFLOW where the mode would allow it: their
    owner is not mapped), and --dry-run's
    note says so."""
    low = mkdir_as(user, userdir / "low")
    mkdir_as(user, low / "mine")
    o = mkdir_as(user, userdir / "ov")
    opts = ("--overlay", f"{low}:ro", "--overlay", str(o))
    r = run(user, debian_sqfs, "perl", "-e", 'rename("/mine", "/mine2") or die "$!\\n"',
            opts=opts)
    assert (r.returncode, r.stderr) == (18, "Invalid cross-device link\n"), r.stderr
    r = run(user, debian_sqfs, "sh", "-c", "mv /mine /mine2 && ls -d /mine2", opts=opts)
    assert (r.returncode, r.stdout) == (0, "/mine2\n"), r.stderr     # mv copies instead
    r = run(user, debian_sqfs, "sh", "-c", "echo x > /usr/local/x", opts=opts)
    assert r.returncode != 0 and ("Permission denied" in r.stderr
                                  or "Value too large for defined data type" in r.stderr), r.stderr
    r = run(user, debian_sqfs, "true", opts=("--dry-run",) + opts)
    assert "--fakeroot writes them" in r.stdout, r.stdout


# ------------------------------------------------------------ ext3, SquashFS, SIF

def test_ext3_overlay_persists(user, image, userdir):
    e = make_ext3(user, userdir / "ov.ext3")
    r = run(user, image, "sh", "-c", "echo e3 > /e3 && cat /e3", opts=("--overlay", str(e)))
    assert (r.returncode, r.stdout) == (0, "e3\n"), r.stderr
    r = run(user, image, "cat", "/e3", opts=("--overlay", f"{e}:ro"))
    assert (r.returncode, r.stdout) == (0, "e3\n"), r.stderr
    assert subprocess.run(["e2fsck", "-fn", str(e)], capture_output=True).returncode == 0


def test_ext3_overlay_keeps_every_run_and_is_left_clean(user, demo_sqfs, userdir):
    """Run after run into one ext3 overlay, each writing a file: every file is there
    and the superblock says clean. fuse2fs flushes when its container ends (SIGHUP,
    one thread: a multithreaded libfuse 2 aborted at exit after pivot_root, loading
    libgcc_s.so.1, so the superblock stayed "not clean" and about one run in ten lost
    its file); the next run waits for that flush, not "in use"."""
    e = make_ext3(user, userdir / "ov.ext3")
    for i in range(6):
        r = run(user, demo_sqfs, "sh", "-c", f"echo {i} > /f{i}", opts=("--overlay", str(e)))
        assert r.returncode == 0, r.stderr
    wait_no_leaks()
    state = subprocess.run(["dumpe2fs", "-h", str(e)], capture_output=True, text=True).stdout
    assert any(ln.split() == ["Filesystem", "state:", "clean"] for ln in state.splitlines()), state
    for i in range(6):
        out = subprocess.run(["debugfs", "-R", f"cat upper/f{i}", str(e)],
                             capture_output=True, text=True).stdout
        assert out == f"{i}\n", (i, out)


def test_read_only_overlays_stack_as_given(user, demo_sqfs, userdir):
    """Of several read-only overlays the first given is the uppermost, as Apptainer
    stacks them (lowerdir = the read-only overlays in order, then the image)."""
    for name in ("a", "b"):
        d = userdir / name
        mkdir_as(user, d / "upper")
        (d / "upper" / "which").write_text(name + "\n")
        (d / "upper" / ("only-" + name)).write_text(name + "\n")
        subprocess.run(["chown", "-R", f"{user.uid}:{user.gid}", str(d)], check=True)
    for first, second in (("a", "b"), ("b", "a")):
        r = run(user, demo_sqfs, "cat", "/which", "/only-a", "/only-b",
                opts=("-o", f"{userdir / first}:ro", "-o", f"{userdir / second}:ro"))
        assert (r.returncode, r.stdout) == (0, f"{first}\na\nb\n"), r.stderr


def test_squashfs_overlay_is_read_only(user, demo_sqfs, userdir):
    tree = userdir / "tree"
    (tree / "extra").mkdir(parents=True)
    (tree / "extra" / "f").write_text("sq\n")
    sq = userdir / "extra.sqfs"
    subprocess.run(["mksquashfs", str(tree), str(sq), "-quiet", "-no-progress"], check=True)
    os.chmod(sq, 0o644)
    r = run(user, demo_sqfs, "sh", "-c", "cat /extra/f; echo x > /extra/g",
            opts=("--overlay", str(sq)))       # no :ro needed: always read-only
    assert r.stdout == "sq\n" and r.returncode != 0, r.stderr


def test_sif_overlay_partition(user, demo_sif, userdir):
    s = userdir / "with-overlay.sif"
    shutil.copy(demo_sif, s)
    add_overlay_partition(s, make_ext3(user, userdir / "part.ext3"))
    os.chown(s, user.uid, user.gid)
    # without --writable: read-only
    r = run(user, s, "sh", "-c", "echo x > /in-sif")
    assert r.returncode != 0
    r = run(user, s, "sh", "-c", "echo in-sif > /in-sif && cat /in-sif", opts=("--writable",))
    assert (r.returncode, r.stdout) == (0, "in-sif\n"), r.stderr
    r = run(user, s, "cat", "/in-sif")
    assert (r.returncode, r.stdout) == (0, "in-sif\n"), r.stderr
    # the SIF as an --overlay of another image: its partition
    r = run(user, demo_sif, "cat", "/in-sif", opts=("--overlay", f"{s}:ro"))
    assert (r.returncode, r.stdout) == (0, "in-sif\n"), r.stderr
    one_line_error(run(user, demo_sif, "true", opts=("--writable",)), 2,
                   "is a SIF image: writing it needs an overlay partition")


# ------------------------------------------------------------ tmpfs

def test_writable_tmpfs(user, image):
    r = run(user, image, "sh", "-c", "echo t > /t && cat /t && df -k / | tail -1",
            opts=("--writable-tmpfs",))
    assert r.returncode == 0 and r.stdout.startswith("t\n"), r.stderr
    assert r.stdout.split()[-5] == str(64 * 1024)        # 64 MiB, Apptainer's default
    r = run(user, image, "sh", "-c", "dd if=/dev/zero of=/big bs=1M count=80 2>&1",
            opts=("--writable-tmpfs",))
    assert r.returncode != 0 and "No space left" in r.stdout, r.stdout
    assert run(user, image, "test", "-e", "/t").returncode == 1      # gone


def test_tmpfs_size_from_the_site(demo_sqfs):
    class I:
        kind, path = "squashfs", str(demo_sqfs)
    layers = ovl.layers([], I, writable_tmpfs=True, tmpfs_mib=8)
    assert [(x.kind, x.size_mib, x.writable) for x in layers] == [("tmpfs", 8, True)]


# ------------------------------------------------------------ drivers

def test_fuse_overlayfs_forced(user, image, userdir):
    o = mkdir_as(user, userdir / "ov")
    env = {"HPCIMAGE_OVERLAY_DRIVER": "fuse-overlayfs"}
    assert root_fstype(user, image, ("--overlay", str(o)), env) == "fuse.fuse-overlayfs"
    r = run(user, image, "sh", "-c", "echo f > /f && cat /f", opts=("--overlay", str(o)),
            env=env)
    assert (r.returncode, r.stdout) == (0, "f\n"), r.stderr
    assert (o / "upper" / "f").read_text() == "f\n"
    # the kernel's where nothing is forced; a layer fuse-overlayfs wrote stays with it
    fresh = mkdir_as(user, userdir / "fresh")
    assert root_fstype(user, image, ("--overlay", str(fresh))) == "overlay"
    assert root_fstype(user, image, ("--overlay", str(o))) == "fuse.fuse-overlayfs"


def test_ext3_uses_fuse_overlayfs_and_tmpfs_the_kernel(user, demo_sqfs, userdir):
    e = make_ext3(user, userdir / "ov.ext3")
    assert root_fstype(user, demo_sqfs, ("--overlay", str(e))) == "fuse.fuse-overlayfs"
    want = "overlay" if ovl.kernel_can(ovl.TMPFS_MAGIC) else "fuse.fuse-overlayfs"
    assert root_fstype(user, demo_sqfs, ("--writable-tmpfs",)) == want


def test_kernel_probe():
    assert ovl.kernel_release("6.18.44-fc") == (6, 18)
    assert ovl.kernel_release("5.4.0-150-generic") == (5, 4)
    assert not ovl.kernel_can(None, "5.10.1")
    assert ovl.kernel_can(None, "5.11.0")
    assert not ovl.kernel_can(ovl.TMPFS_MAGIC, "6.5.0") and ovl.kernel_can(ovl.TMPFS_MAGIC, "6.6.1")
    assert not ovl.kernel_can(ovl.FUSE_MAGIC, "6.18.0")


# ------------------------------------------------------------ locks and kill -9

def test_second_writer_refused(user, demo_sqfs, userdir):
    o = mkdir_as(user, userdir / "ov")
    first = user.popen(runtime_argv("exec", "--overlay", str(o), str(demo_sqfs), "sleep", "20"),
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 10
        while not (o / "work").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.3)
        r = run(user, demo_sqfs, "true", opts=("--overlay", str(o)))
        one_line_error(r, 1, f"overlay {o} is in use by another container that writes it "
                             "(a writable overlay serves one container at a time): wait "
                             "until it exits")
        one_line_error(run(user, demo_sqfs, "true", opts=("--overlay", f"{o}:ro")), 1,
                       "is in use by another container that writes it")
    finally:
        first.kill()
        first.wait()
    wait_no_leaks()
    assert run(user, demo_sqfs, "true", opts=("--overlay", str(o))).returncode == 0


def test_kill9_during_a_write(user, demo_sqfs, userdir):
    e = make_ext3(user, userdir / "ov.ext3", size="256M")
    p = user.popen(runtime_argv("exec", "--overlay", str(e), str(demo_sqfs), "dd",
                                "if=/dev/zero", "of=/big", "bs=1M", "count=200"),
                   stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    time.sleep(1.0)
    p.send_signal(signal.SIGKILL)       # the launcher became dd
    p.wait()
    procs, mounts = wait_no_leaks()
    assert not procs and not mounts
    # fuse2fs outlives the killed launcher long enough to flush (SIGHUP): clean
    fsck = subprocess.run(["e2fsck", "-fn", str(e)], capture_output=True, text=True)
    assert fsck.returncode == 0, fsck.stdout
    r = run(user, demo_sqfs, "sh", "-c", "echo after > /after && cat /after",
            opts=("--overlay", str(e)))
    assert (r.returncode, r.stdout) == (0, "after\n"), r.stderr
    assert "warning" not in r.stderr, r.stderr


def test_an_ext3_overlay_left_unclean_the_next_use_says_so(user, demo_sqfs, userdir):
    """An ext3 overlay whose superblock says "not clean" (its fuse2fs was SIGKILLed: the
    OOM killer, a kill -9 of everything; set here with debugfs): the next writer warns
    once, naming e2fsck, and runs; its own end leaves the file system clean again."""
    e = make_ext3(user, userdir / "ov.ext3")
    subprocess.run(["debugfs", "-w", "-R", "ssv state 0", str(e)], check=True,
                   capture_output=True)
    r = run(user, demo_sqfs, "sh", "-c", "echo after > /after && cat /after",
            opts=("--overlay", str(e)))
    assert (r.returncode, r.stdout) == (0, "after\n"), r.stderr
    warnings = [ln for ln in r.stderr.splitlines() if "warning" in ln]
    assert warnings == [f"hpcimage: warning: {e} was not unmounted cleanly (a container "
                        f"that wrote it was killed): if anything looks wrong, check it with "
                        f"'e2fsck -f {e}' while no container uses it"], r.stderr
    wait_no_leaks()
    r = run(user, demo_sqfs, "cat", "/after", opts=("--overlay", str(e)))
    assert (r.returncode, r.stdout, r.stderr) == (0, "after\n", "")


# ------------------------------------------------------------ errors and --dry-run

def test_errors(user, demo_sqfs, demo_dir, userdir):
    a, b = mkdir_as(user, userdir / "a"), mkdir_as(user, userdir / "b")
    one_line_error(run(user, demo_sqfs, "true", opts=("--overlay", str(a), "--overlay", str(b))),
                   2, f"at most one writable overlay: {a}, {b} (add :ro to the others)")
    one_line_error(run(user, demo_sqfs, "true", opts=("--overlay", str(userdir / "none"))), 2,
                   "no such file or directory")
    junk = userdir / "junk.img"
    junk.write_bytes(b"\0" * 8192)
    one_line_error(run(user, demo_sqfs, "true", opts=("--overlay", str(junk))), 2,
                   "is not an overlay (a directory, an ext3 image, a SquashFS file or a SIF "
                   "with an overlay partition)")
    one_line_error(run(user, demo_sqfs, "true", opts=("--overlay", f"{a}:rx")), 2,
                   "unknown mode 'rx'")
    one_line_error(run(user, demo_sqfs, "true", opts=("--writable",)), 2,
                   "is a SquashFS image (read-only)")
    one_line_error(run(user, demo_sqfs, "true", opts=("--writable-tmpfs",),
                       env={"HPCIMAGE_OVERLAY_DRIVER": "magic"}), 2,
                   "HPCIMAGE_OVERLAY_DRIVER=magic: want auto, kernel or fuse-overlayfs")
    # an ext3 image whose root is not the user's: upper/ cannot be made
    e = make_ext3(user, userdir / "root.ext3", layout=False, owner=False)
    r = run(user, demo_sqfs, "true", opts=("--overlay", str(e)))
    one_line_error(r, 1, "cannot create upper/ in")
    assert "--fakeroot" in r.stderr
    # upper/ and work/ there, but root's (mkfs.ext3 -d of root's tree)
    tree = userdir / "rootstree"
    (tree / "upper").mkdir(parents=True)
    (tree / "work").mkdir()
    e2 = userdir / "root2.ext3"
    subprocess.run(["mkfs.ext3", "-q", "-F", "-d", str(tree), "-E",
                    f"root_owner={user.uid}:{user.gid}", str(e2), "8M"], check=True,
                   capture_output=True)
    os.chown(e2, user.uid, user.gid)
    r = run(user, demo_sqfs, "true", opts=("--overlay", str(e2)))
    one_line_error(r, 1, f"upper/ in {e2} belongs to root or another user, not you")
    assert "--fakeroot" in r.stderr


def test_tmpfs_with_a_writable_overlay_warns(user, demo_sqfs, userdir):
    o = mkdir_as(user, userdir / "ov")
    r = run(user, demo_sqfs, "sh", "-c", "echo x > /x", opts=("--writable-tmpfs", "--overlay", str(o)))
    assert r.returncode == 0 and (o / "upper" / "x").exists()
    assert r.stderr == (f"hpcimage: warning: --writable-tmpfs ignored: the writable overlay "
                        f"{o} takes the writes\n")


def test_dry_run(user, demo_sqfs, userdir):
    o = mkdir_as(user, userdir / "ov")
    r = run(user, demo_sqfs, "true", opts=("--dry-run", "--overlay", str(o)))
    lines = r.stdout.splitlines()
    assert any(ln.startswith(f"layer {o} -> ") and "locked (one writer)" in ln for ln in lines)
    assert any(ln.startswith("overlay lower=") and "upper=" in ln for ln in lines)
    assert not any(ln.startswith("readonly ") for ln in lines)     # the root is writable
    assert not (o / "upper").exists()                              # nothing done
    r = run(user, demo_sqfs, "true", opts=("--dry-run",))
    assert not any(ln.startswith(("layer ", "overlay ")) for ln in r.stdout.splitlines())


# ------------------------------------------------------------ user trial fixes

def test_fuse_overlayfs_layers_read_by_fuse_overlayfs(user, demo_dir, userdir):
    """An overlay fuse-overlayfs wrote (an ext3 image always; a directory where it was
    forced) keeps its deletions when reused read-only: its whiteouts (.wh.NAME) are not
    shown as files, the deleted image file does not come back (a sandbox the user
    owns, so that its files can be deleted)."""
    demo_sqfs = userdir / "sandbox"
    shutil.copytree(demo_dir, demo_sqfs, symlinks=True)
    subprocess.run(["chown", "-R", f"{user.uid}:{user.gid}", str(demo_sqfs)], check=True)
    script = "rm /singularity && mkdir /dd && touch /dd/a"
    check = "ls -a / /dd; test -L /singularity && echo BACK; true"
    e = make_ext3(user, userdir / "ov.img")
    o = mkdir_as(user, userdir / "ov")
    forced = {"HPCIMAGE_OVERLAY_DRIVER": "fuse-overlayfs"}
    for layer, env in ((e, None), (o, forced)):
        r = run(user, demo_sqfs, "sh", "-c", script, env=env, opts=("-o", str(layer)))
        assert r.returncode == 0, r.stderr
        opts = ("-o", f"{layer}:ro")
        r = run(user, demo_sqfs, "sh", "-c", check, opts=opts)
        assert r.returncode == 0 and r.stderr == "", r.stderr
        assert ".wh." not in r.stdout and "BACK" not in r.stdout, r.stdout
        assert "/dd:\n.\n..\na\n" in r.stdout, r.stdout
        assert root_fstype(user, demo_sqfs, opts) == "fuse.fuse-overlayfs"
    # a directory the kernel wrote stays with the kernel (no .wh. at its top)
    k = mkdir_as(user, userdir / "k")
    assert run(user, demo_sqfs, "rm", "/singularity", opts=("-o", str(k))).returncode == 0
    if ovl.kernel_can(None):
        assert root_fstype(user, demo_sqfs, ("-o", f"{k}:ro")) == "overlay"


@pytest.mark.parametrize("driver", ["kernel", "fuse-overlayfs"])
def test_image_dirs_keep_their_owner(user, debian_sqfs, userdir, driver):
    """Without --fakeroot the image's root-owned directories stay unwritable through
    the overlay, also where a bind target the image lacks lies below them (the layer
    of those targets is the lowest: /etc keeps the image's owner); the targets exist."""
    if driver == "kernel" and not ovl.kernel_can(None):
        pytest.skip("the kernel's overlayfs cannot serve a user namespace here")
    o = mkdir_as(user, userdir / "ov")
    env = {"HPCIMAGE_OVERLAY_DRIVER": driver}
    r = run(user, debian_sqfs, "sh", "-c", "stat -c %u /etc /usr; touch /etc/foo",
            opts=("-o", str(o), "-B", f"{userdir}:/etc/hpcimage-site"), env=env)
    assert r.returncode != 0 and "/etc/foo" in r.stderr, (r.stdout, r.stderr)
    assert r.stdout.split() == ["65534", "65534"], r.stdout
    assert not (o / "upper" / "etc" / "foo").exists()
    r = run(user, debian_sqfs, "sh", "-c", "touch /etc/hpcimage-site/x && ls -d ~ $PWD",
            opts=("-o", str(o), "-B", f"{userdir}:/etc/hpcimage-site"), env=env,
            cwd=str(userdir))
    assert r.returncode == 0, r.stderr
    assert (userdir / "x").exists()


def test_lock_advice_fits_the_case(user, demo_sqfs, demo_sif, userdir):
    o = mkdir_as(user, userdir / "ov")

    def hold(*opts, image=demo_sqfs, ready=None):
        p = user.popen(runtime_argv("exec", *opts, str(image), "sleep", "20"),
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 10
        while ready and not ready() and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.5)
        return p

    reader = hold("-o", f"{o}:ro")
    try:
        one_line_error(run(user, demo_sqfs, "true", opts=("-o", str(o))), 1,
                       f"overlay {o} is in use by another container that reads it (a "
                       "writable overlay serves one container at a time): add :ro to read "
                       "it too, or wait until it exits")
        assert run(user, demo_sqfs, "true", opts=("-o", f"{o}:ro")).returncode == 0
    finally:
        reader.kill()
        reader.wait()
    wait_no_leaks()
    writer = hold("-o", str(o), ready=lambda: (o / "work").exists())
    try:
        r = run(user, demo_sqfs, "true", opts=("-o", f"{o}:ro"))
        one_line_error(r, 1, f"overlay {o} is in use by another container that writes it "
                             "(a writable overlay serves one container at a time): wait "
                             "until it exits")
        assert ":ro" not in r.stderr
    finally:
        writer.kill()
        writer.wait()
    wait_no_leaks()
    # a SIF with an overlay partition: a plain exec meets a --writable one
    s = userdir / "with-overlay.sif"
    shutil.copy(demo_sif, s)
    add_overlay_partition(s, make_ext3(user, userdir / "part.ext3"))
    os.chown(s, user.uid, user.gid)
    writer = hold("--writable", image=s)
    try:
        time.sleep(0.5)
        r = run(user, s, "true")
        one_line_error(r, 1, f"the overlay partition of {s} is in use by another container "
                             "that writes it (a writable overlay serves one container at a "
                             "time): wait until it exits")
    finally:
        writer.kill()
        writer.wait()
    wait_no_leaks()


def test_fakeroot_overlay_without_fakeroot(user, demo_sqfs, userdir):
    img = userdir / "fr.img"
    r = user.run(cli_argv("overlay", "create", "--fakeroot", str(img)))
    assert r.returncode == 0, r.stderr
    r = run(user, demo_sqfs, "true", opts=("-o", str(img)))
    one_line_error(r, 1, f"overlay {img}: upper/ in {img} belongs to root or another user, "
                         "not you (an overlay made with --fakeroot is written with "
                         "--fakeroot): use --fakeroot, or an overlay of your own")
    assert "cannot create" not in r.stderr

