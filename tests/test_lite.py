"""The build's helpers on the standard library (hpcimage.lite, which stood in for
subprocess, shutil, tempfile and json, is gone): programs run with their output
captured and the caller's signal state, trees removed without following links, busybox
copied as copy2 copies, the namespace child's result passed back."""
import os
import signal
import types

import pytest

from hpcimage.imagebuild import convert
from hpcimage.imagebuild import builder, busybox, userns
from hpcimage.errors import HpcimageError


def test_run_captures_both_streams_and_the_status(capsys):
    """convert._run (mksquashfs, unsquashfs): stdin /dev/null, stdout and stderr
    captured together, the status as subprocess reports it, a missing program named."""
    convert._run(["sh", "-c", "echo out; echo err >&2; cat; exit 3"], "step", nonfatal=(3,))
    assert capsys.readouterr().err == "hpcimage: warning: sh: out\nhpcimage: warning: sh: err\n"
    with pytest.raises(HpcimageError, match=r"^step: sh failed \(exit 3\): err$"):
        convert._run(["sh", "-c", "echo out; echo err >&2; cat; exit 3"], "step")
    with pytest.raises(HpcimageError, match=r"^step: sh failed \(exit -15\): no output$"):
        convert._run(["sh", "-c", "kill -TERM $$"], "step")          # a signal: -N
    with pytest.raises(HpcimageError, match="^step: no-such-program-hpcimage not found$"):
        convert._run(["no-such-program-hpcimage"], "step")


def _tool(path, text):
    path.write_text("#!/bin/sh\n" + text)
    path.chmod(0o755)


def test_id_map_tools_side_by_side_with_the_callers_signal_state(tmp_path, monkeypatch):
    """userns._map runs newuidmap and newgidmap side by side (newuidmap here waits for
    newgidmap's mark); each starts with an empty signal mask and SIGINT and SIGPIPE at
    their defaults although the build ignores SIGINT meanwhile; a failure says which
    tool and its last line."""
    mark = tmp_path / "gid-ran"
    _tool(tmp_path / "newuidmap", f"""for i in $(seq 100); do [ -e {mark} ] && break; sleep 0.05; done
[ -e {mark} ] || {{ echo not side by side; exit 1; }}
grep -E '^Sig(Ign|Blk):' /proc/$$/status > {tmp_path}/uid-state
echo a
""")
    _tool(tmp_path / "newgidmap", f"touch {mark}; echo b; exit 1\n")
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    m = types.SimpleNamespace(mode="subids", uid=1000, gid=1000, subuid=(100000, 65536),
                              subgid=(100000, 65536))
    old = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        with pytest.raises(HpcimageError, match="^build: newgidmap failed: b$"):
            userns._map(1, m)
    finally:
        signal.signal(signal.SIGINT, old)
    state = dict(ln.split(":") for ln in (tmp_path / "uid-state").read_text().split("\n") if ln)
    assert int(state["SigBlk"], 16) == 0
    ignored = int(state["SigIgn"], 16)
    assert not ignored & (1 << (signal.SIGINT - 1)) and not ignored & (1 << (signal.SIGPIPE - 1))


def make_tree(root, outside):
    (root / "d/e").mkdir(parents=True)
    (root / "d/e/f").write_text("f")
    (root / "g").write_text("g")
    (root / "link-out").symlink_to(outside)            # a directory outside the tree
    (root / "d/link-file").symlink_to(outside / "keep")
    os.link(root / "g", root / "d/hard")


@pytest.mark.parametrize("remove", [builder.remove_tree, convert._remove])
def test_remove_tree_removes_everything_and_follows_no_link(tmp_path, remove):
    """The build's clean-up (builder.remove_tree) and a replaced OUT (convert._remove):
    the whole tree, nothing behind its links; a link to a directory is removed as a link."""
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep").write_text("keep")
    root = tmp_path / "tree"
    make_tree(root, outside)
    remove(str(root))
    assert not root.exists() and (outside / "keep").read_text() == "keep"
    (tmp_path / "link").symlink_to(outside)
    remove(str(tmp_path / "link"))
    assert not os.path.lexists(tmp_path / "link") and (outside / "keep").is_file()
    remove(str(tmp_path / "missing"))                  # nothing there: nothing to do


def test_busybox_copied_as_copy2(tmp_path):
    """busybox.populate copies the binary with its data, permission bits and times (as
    shutil.copy2), replacing an existing one, and links its applets to it."""
    src = tmp_path / "src"
    src.write_bytes(b"#!/bin/sh\necho busybox ls cat\n#" + os.urandom(300_000).hex().encode())
    os.chmod(src, 0o751)
    os.utime(src, ns=(1_600_000_000_123_456_789, 1_500_000_000_987_654_321))
    root = tmp_path / "root"
    assert busybox.populate(root, busybox=str(src)) == ["busybox", "ls", "cat"]
    a = os.stat(root / "bin/busybox")
    assert (root / "bin/busybox").read_bytes() == src.read_bytes()
    assert (a.st_mode, a.st_mtime_ns) == (0o100751, src.stat().st_mtime_ns)
    assert os.stat(root / "bin/ls").st_ino == a.st_ino
    other = tmp_path / "other"
    other.write_bytes(b"#!/bin/sh\necho busybox\n")
    os.chmod(other, 0o755)
    busybox.populate(root, busybox=str(other))          # an existing file is replaced
    assert (root / "bin/busybox").read_bytes() == other.read_bytes()


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
