"""hpcimage.imagebuild.lite: the build path's stand-ins for subprocess, shutil, tempfile and json
behave as the standard library does in the cases the build uses."""
import json
import os
import random
import shutil
import subprocess
import sys

import pytest

from hpcimage.imagebuild import lite
from hpcimage.linux import spawn
from hpcimage.imagebuild import busybox
from hpcimage.errors import HpcimageError


def test_run_captures_both_streams_and_the_status():
    rc, out = spawn.run(["sh", "-c", "echo out; echo err >&2; cat; exit 3"])
    assert rc == 3 and out == b"out\nerr\n"           # stdin is /dev/null: cat ends
    rc, out = spawn.run(["sh", "-c", "kill -TERM $$"])
    assert rc == -15                                   # as subprocess reports a signal
    with pytest.raises(FileNotFoundError):
        spawn.run(["no-such-program-hpcimage"])


def test_spawn_side_by_side():
    a = spawn.spawn(["sh", "-c", "sleep 0.2; echo a"])
    b = spawn.spawn(["sh", "-c", "echo b; exit 1"])
    assert spawn.finish(*b) == (1, b"b\n")
    assert spawn.finish(*a) == (0, b"a\n")


def make_tree(root, outside):
    (root / "d/e").mkdir(parents=True)
    (root / "d/e/f").write_text("f")
    (root / "g").write_text("g")
    (root / "link-out").symlink_to(outside)            # a directory outside the tree
    (root / "d/link-file").symlink_to(outside / "keep")
    os.link(root / "g", root / "d/hard")


def test_rmtree_removes_everything_and_follows_no_link(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep").write_text("keep")
    root = tmp_path / "tree"
    make_tree(root, outside)
    lite.rmtree(root)
    assert not root.exists() and (outside / "keep").read_text() == "keep"


def test_rmtree_errors_go_to_onerror_or_are_raised(tmp_path):
    calls = []
    lite.rmtree(tmp_path / "missing", onerror=lambda f, p, e: calls.append((f, p, e[0])))
    assert calls == [(os.open, tmp_path / "missing", FileNotFoundError)]
    with pytest.raises(FileNotFoundError):
        lite.rmtree(tmp_path / "missing")
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    with pytest.raises(OSError, match="symbolic link"):
        lite.rmtree(tmp_path / "link")                 # as shutil.rmtree refuses
    assert (tmp_path / "real").is_dir()


def test_copy_file_as_copy2(tmp_path):
    src = tmp_path / "src"
    src.write_bytes(os.urandom(300_000))
    os.chmod(src, 0o751)
    os.utime(src, ns=(1_600_000_000_123_456_789, 1_500_000_000_987_654_321))
    lite.copy_file(src, tmp_path / "a")
    shutil.copy2(src, tmp_path / "b")
    a, b = os.stat(tmp_path / "a"), os.stat(tmp_path / "b")
    assert (tmp_path / "a").read_bytes() == src.read_bytes()
    want = (0o100751, src.stat().st_mtime_ns)
    assert (a.st_mode, a.st_mtime_ns) == (b.st_mode, b.st_mtime_ns) == want
    (tmp_path / "a").write_text("longer than nothing")       # an existing file is replaced
    (tmp_path / "empty").write_bytes(b"")
    lite.copy_file(tmp_path / "empty", tmp_path / "a")
    assert (tmp_path / "a").read_bytes() == b""


@pytest.mark.parametrize("env", [{}, {"TMPDIR": "/nonexistent"}, {"TMPDIR": "/var/tmp"},
                                 {"TMPDIR": "", "TEMP": "/var/tmp/"}, {"TMP": "/etc/passwd"}])
def test_gettempdir_as_tempfile(env):
    code = "import tempfile, sys; sys.stdout.write(tempfile.gettempdir())"
    clean = {k: v for k, v in os.environ.items() if k not in ("TMPDIR", "TEMP", "TMP")}
    want = subprocess.run([sys.executable, "-I", "-c", code], env={**clean, **env},
                          capture_output=True, text=True, cwd="/").stdout
    saved = {k: os.environ.pop(k, None) for k in ("TMPDIR", "TEMP", "TMP")}
    try:
        os.environ.update(env)
        assert lite.gettempdir() == want
    finally:
        for k in ("TMPDIR", "TEMP", "TMP"):
            os.environ.pop(k, None)
            if saved[k] is not None:
                os.environ[k] = saved[k]


def test_dumps_labels_as_json():
    rnd = random.Random(5)
    chars = "ab \"\\/\n\t\x00\x1f\u00e9\u2028\U0001f600:,{}"
    for _ in range(300):
        labels = {"".join(rnd.choice(chars) for _ in range(rnd.randrange(0, 6))):
                  "".join(rnd.choice(chars) for _ in range(rnd.randrange(0, 9)))
                  for _ in range(rnd.randrange(0, 5))}
        for sort in (False, True):
            assert lite.dumps_labels(labels, sort) == json.dumps(labels, indent=1,
                                                                 sort_keys=sort)
    odd = {"b": 1, "a": ["x", None]}                  # not all strings: json does it
    assert lite.dumps_labels(odd, True) == json.dumps(odd, indent=1, sort_keys=True)


def test_busybox_that_cannot_list_its_applets(tmp_path):
    with pytest.raises(HpcimageError, match=r"--list failed \(exit 1\)"):
        busybox.populate(tmp_path / "root", busybox="/bin/false")


def test_namespace_child_result_comes_back_by_marshal():
    """userns.run_as_root passes its child's result back with marshal (not json):
    plain values round-trip, tuples included; a value marshal cannot carry is a clear
    internal error, not 'the build process died'."""
    from hpcimage.imagebuild import userns
    root = userns.IdMap("root")
    assert userns.run_as_root(lambda: {"k": ("a", 1, None)}, (), root) == {"k": ("a", 1, None)}
    with pytest.raises(HpcimageError, match="internal error: result object cannot be passed"):
        userns.run_as_root(object, (), root)
