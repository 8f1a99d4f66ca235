"""The launch plan as data: plan(request) of a Request built by hand (options.parse of
an argv, an opened test image, a site dict, a host environment, the user, the session
and current directories), asserted on the types and named fields of its ops
(hpcimage.runtime.ops); the pinning pass; describe().
No container is started: nothing here mounts anything."""
import os
import shutil
import sys
import tempfile

import pytest

sys.path.insert(0, os.path.dirname(__file__))
import fakehost  # noqa: E402

from hpcimage.image import open_image  # noqa: E402
from hpcimage.host.root import LIBS_DIR  # noqa: E402
from hpcimage.runtime import options  # noqa: E402
from hpcimage.runtime.plan import Plan, plan, split  # noqa: E402
from hpcimage.config.policy import Policy  # noqa: E402
from hpcimage.runtime.request import Request  # noqa: E402
from hpcimage.runtime.ops import (Bind, Chdir, Exec, IdentityFiles, MountImage,  # noqa: E402
                                  Pivot, Private, Remount, RootFs, Session, UserNs,
                                  pin_sources)

# A directory outside every default bind (/tmp, /var/tmp, home): a project directory.
OUTSIDE = "/var/cache/hpcimage"
os.makedirs(OUTSIDE, exist_ok=True)

ORDER_HEAD = [UserNs, Private, Session, MountImage, RootFs, IdentityFiles]
ORDER_TAIL = [Remount, Pivot, Chdir, Exec]


@pytest.fixture
def sess(tmp_path):
    """The session directory, the caller's home and cwd (a project directory): given
    to the Request, nothing of this process changed."""
    s = tmp_path / "sess"
    s.mkdir()
    home = tmp_path / "home"
    home.mkdir()
    proj = tempfile.mkdtemp(prefix="hpcimage-plan-proj-", dir=OUTSIDE)  # not below /tmp, /var/tmp
    yield str(s), str(home), proj
    os.rmdir(proj)


def host_env(home, **kw):
    e = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": home}
    e.update(kw)
    return e


UID, GID = 1234, 567         # the request's, not this process's


def request(argv, env, sess, site=None, image=None):
    """A Request built by hand: options parsed from argv, the image opened, the user,
    the session directory and the current directory given."""
    base, home, proj = sess
    opts = options.parse(argv, env)
    return Request(opts, open_image(image or opts.image), env, base, Policy.from_json(site or {}),
                   uid=UID, gid=GID, user="u", home=home, gecos="",
                   shell="/bin/sh", group="g", cwd=proj)


def make(argv, env, sess, site=None, image=None):
    return plan(request(argv, env, sess, site, image))


def of(p, t):
    return [op for op in p.ops if type(op) is t]


def binds(p):
    return {b.dst: b for b in of(p, Bind)}


def check_shape(p, base):
    """The order of the op types; every op self-contained (absolute paths, the root
    and the image's mount point as fields)."""
    types = [type(op) for op in p.ops]
    n = len(ORDER_HEAD)
    assert types[:n] == ORDER_HEAD and types[-4:] == ORDER_TAIL, types
    assert set(types[n:-4]) == {Bind}
    root, image_root = base + "/root", base + "/image"
    assert of(p, Session)[0].base == base
    mi = of(p, MountImage)[0]
    assert mi.at == image_root and mi.fd is None
    rf = of(p, RootFs)[0]
    assert (rf.image_dir, rf.root) == (image_root, root)
    assert rf.targets == [b.dst for b in of(p, Bind)]
    idf = of(p, IdentityFiles)[0]
    assert (idf.base, idf.image_root) == (base, image_root)
    assert (idf.uid, idf.gid, idf.user, idf.group, idf.shell) == (UID, GID, "u", "g", "/bin/sh")
    assert of(p, UserNs)[0].uid == UID and of(p, UserNs)[0].gid == GID
    for b in of(p, Bind):
        assert b.root == root and b.fd is None
        assert b.src.startswith("/") and b.dst.startswith("/"), b
        assert not b.src.startswith("session:")
    assert of(p, Remount)[0].path == root and of(p, Pivot)[0].root == root
    # describe(): one op's lines each, in order; the first word is the op's name
    lines = [ln for ln in p.describe().splitlines() if not ln.startswith(("#", " "))]
    assert [ln.split()[0] for ln in lines] == [op.name for op in p.ops]


def test_plain_exec(sess, demo_dir):
    base, home, proj = sess
    env = host_env(home)
    p = make(["exec", str(demo_dir), "true", "a b"], env, sess)
    check_shape(p, base)
    mi = of(p, MountImage)[0]
    assert mi.image.path == str(demo_dir) and mi.image.kind == "sandbox"
    b = binds(p)
    for d in ("/proc", "/sys", "/dev", "/tmp"):
        assert (b[d].src, b[d].ro, b[d].what) == (d, False, "system")
    assert (b["/etc/passwd"].src, b["/etc/passwd"].ro) == (base + "/passwd", True)
    assert (b["/etc/group"].src, b["/etc/group"].ro) == (base + "/group", True)
    assert (b[home].src, b[home].what) == (home, "home")
    assert (b[proj].src, b[proj].what) == (proj, "current directory")
    c = of(p, Chdir)[0]
    assert (c.workdir, c.home, c.explicit, c.note, c.prog) == (proj, home, False, None,
                                                               "hpcimage exec")
    e = of(p, Exec)[0]
    assert (e.verb, e.argv, e.prog, e.app, e.rcfile) == ("exec", ["true", "a b"],
                                                        "hpcimage exec", None, None)
    assert e.env["HOME"] == home and e.env["APPTAINER_CONTAINER"] == str(demo_dir)
    assert p.warnings == []
    head, tail = split(p, Chdir)
    assert [type(op) for op in tail.ops] == [Chdir, Exec]
    assert head.ops + tail.ops == p.ops


def test_contain(sess, demo_dir):
    base, home, proj = sess
    p = make(["exec", "--contain", str(demo_dir), "true"], host_env(home), sess)
    check_shape(p, base)
    b = binds(p)
    assert (b["/dev"].src, b["/dev"].what) == (base + "/dev", "--contain: minimal /dev")
    assert b["/dev/null"].src == "/dev/null" and "/dev/shm" not in b
    assert (b["/tmp"].src, b["/var/tmp"].src) == (base + "/tmp", base + "/vartmp")
    assert (b[home].src, b[home].what) == (base + "/home", "--contain: empty home")
    assert proj not in b and "/sys" in b and "/proc" in b
    assert of(p, Chdir)[0].workdir == home


def test_bind_target_the_image_lacks(sess, bare_dir, tmp_path):
    """A -B target the image lacks is a mount point of the root (RootFs.targets): the
    root is then a skeleton that adds it (decided when it runs)."""
    base, home, proj = sess
    data = tmp_path / "data"
    data.mkdir()
    assert not os.path.lexists(os.path.join(str(bare_dir), "no/such"))
    p = make(["exec", "-B", f"{data}:/no/such/data:ro", str(bare_dir), "true"], host_env(home),
             sess)
    check_shape(p, base)
    b = binds(p)["/no/such/data"]
    assert (b.src, b.ro, b.what, b.root) == (str(data), True, "-B", base + "/root")
    assert "/no/such/data" in of(p, RootFs)[0].targets
    assert str(b) == f"bind {data} -> /no/such/data ro  # -B"


def test_bind_source_missing_is_an_error(sess, demo_dir):
    from hpcimage.errors import UsageError
    base, home, proj = sess
    with pytest.raises(UsageError, match="bind source /no/such/src does not exist"):
        make(["exec", "-B", "/no/such/src:/x", str(demo_dir), "true"], host_env(home), sess)


@pytest.fixture(scope="module")
def fake_root():
    base = "/tmp/hpcimage-tests"
    os.makedirs(base, exist_ok=True)
    d = tempfile.mkdtemp(prefix="fakehost-plan-", dir=base)
    os.chmod(d, 0o755)
    fakehost.build(d)
    yield d
    shutil.rmtree(d, ignore_errors=True)


def test_gpu_via_fake_host_root(sess, demo_dir, fake_root):
    """--nv on a host root that is not this machine's /: a private /dev with the fake
    host's device nodes, its driver libraries read-only below LIBS_DIR, the library
    path prepended; CUDA_VISIBLE_DEVICES renumbered, the other GPUs left out."""
    base, home, proj = sess
    env = host_env(home, HPCIMAGE_HOST_ROOT=fake_root, CUDA_VISIBLE_DEVICES="3,1")
    p = make(["exec", "--nv", str(demo_dir), "true"], env, sess)
    check_shape(p, base)
    b = binds(p)
    assert (b["/dev"].src, b["/dev"].what) == (base + "/dev", "minimal /dev + selected devices")
    for n in ("nvidiactl", "nvidia-uvm", "nvidia3", "nvidia1"):
        assert b[f"/dev/{n}"].src == f"{fake_root}/dev/{n}" and not b[f"/dev/{n}"].ro
    assert "/dev/nvidia0" not in b and "/dev/nvidia2" not in b
    lib = b[f"{LIBS_DIR}/libcuda.so.1"]
    assert lib.ro and lib.src.startswith(fake_root + "/")
    e = of(p, Exec)[0]
    assert e.env["LD_LIBRARY_PATH"].split(":")[0] == LIBS_DIR
    assert e.env["CUDA_VISIBLE_DEVICES"] == "1,0"
    # device binds come after the minimal /dev they are bound into
    dsts = [x.dst for x in of(p, Bind)]
    assert dsts.index("/dev") < dsts.index("/dev/nvidia3")
    # the discovery's notes reach the plan and --dry-run
    note = next(n for n in p.notes if "GPUs visible" in n)
    assert note.startswith("--nv: 2 of 4 GPUs visible")
    assert f"# note: {note}\n" in p.describe()


def test_mpi_bind_model(sess, demo_dir):
    """image-mpi --mpi-mode bind: the host MPI library and what it needs, read-only
    below LIBS_DIR, from the host's ld.so.cache (Open MPI on the test machine)."""
    from hpcimage.runtime.mpi.rank import rank_plan
    base, home, proj = sess
    env = host_env(home, HPCIMAGE_IMAGE=str(demo_dir), OMPI_COMM_WORLD_RANK="0")
    p = rank_plan(request(["image-mpi-rank", "--mpi-mode", "bind", "--", "true"], env, sess))
    check_shape(p, base)
    mpi = [b for b in of(p, Bind) if b.what == "host MPI (openmpi) for the bind model"]
    assert any(b.dst == f"{LIBS_DIR}/libmpi.so.40" for b in mpi), [b.dst for b in mpi]
    assert all(b.ro and b.dst.startswith(LIBS_DIR + "/") for b in mpi)
    e = of(p, Exec)[0]
    assert LIBS_DIR in e.env["LD_LIBRARY_PATH"].split(":")
    assert e.env["OMPI_COMM_WORLD_RANK"] == "0" and e.prog == "image-mpi"
    assert of(p, Chdir)[0].prog == "image-mpi"


def test_lmod_inside(sess, demo_dir):
    """site.json "lmod": the host's Lmod tree and Lua read-only at their paths, the
    MODULEPATH directory (outside every other bind), bash's rcfile for shell."""
    base, home, proj = sess
    mods = tempfile.mkdtemp(prefix="hpcimage-plan-mods-", dir=OUTSIDE)
    try:
        site = {"lmod": {"modulepath": [mods]}}
        p = make(["shell", str(demo_dir)], host_env(home), sess, site)
        check_shape(p, base)
        by_what = {}
        for b in of(p, Bind):
            by_what.setdefault(b.what, []).append(b)
        tree = by_what["Lmod inside (lmod_in_image)"]
        assert tree and all(b.ro for b in tree)
        assert [(b.src, b.dst, b.ro) for b in by_what["MODULEPATH (lmod_in_image)"]] == [
            (mods, mods, True)]
        assert any(w.startswith("Lua for Lmod (lmod_in_image)") for w in by_what)
        e = of(p, Exec)[0]
        assert e.verb == "shell" and e.rcfile and e.rcfile == e.env["BASH_ENV"]
        assert e.describe()[0].startswith(f"exec /bin/bash --rcfile {e.rcfile}  # ")
    finally:
        os.rmdir(mods)


def test_deleted_cwd_and_pwd(sess, demo_dir):
    """A current directory deleted on the host (Request.cwd None): the command runs in
    the home directory when it is bound, with a warning; --pwd is taken as given."""
    base, home, proj = sess
    r = request(["exec", str(demo_dir), "true"], host_env(home), sess)
    r.cwd, r.cwd_gone = None, "/gone/dir"
    p = plan(r)
    check_shape(p, base)
    assert of(p, Chdir)[0].workdir == home and proj not in binds(p)
    assert p.warnings == [f"cannot enter /gone/dir in the container (deleted on the host); "
                          f"running in {home}"]
    p = make(["exec", "--pwd", "/w", str(demo_dir), "true"], host_env(home), sess)
    c = of(p, Chdir)[0]
    assert (c.workdir, c.explicit) == ("/w", True)
    from hpcimage.errors import UsageError
    with pytest.raises(UsageError, match="^--pwd wants an absolute path, got 'w'$"):
        make(["exec", "--pwd", "w", str(demo_dir), "true"], host_env(home), sess)


def test_pin_sources_returns_new_ops_with_fds(tmp_path):
    """Sources below the session directory are opened (the fd a field of a new op);
    the session's own files and everything else are left as they are."""
    base = str(tmp_path)
    (tmp_path / "data").mkdir()
    (tmp_path / "img.sqfs").write_bytes(b"x")
    from hpcimage.image import Image
    img = Image(base + "/img.sqfs", "squashfs")
    ops = [Session(base), MountImage(img, base + "/image"),
           Bind(base + "/data", "/data", False, "-B", base + "/root"),
           Bind(base + "/passwd", "/etc/passwd", True, "files", base + "/root"),
           Bind("/proc", "/proc", False, "system", base + "/root")]
    out = pin_sources(ops)
    try:
        assert out[0] is ops[0] and out[3] is ops[3] and out[4] is ops[4]
        assert type(out[1]) is MountImage and out[1].fd is not None and ops[1].fd is None
        assert out[1].image is img and img.path == base + "/img.sqfs"
        assert type(out[2]) is Bind and out[2].fd is not None and ops[2].fd is None
        assert (out[2].src, out[2].dst, out[2].root) == (base + "/data", "/data", base + "/root")
        assert os.path.samestat(os.fstat(out[2].fd), os.stat(base + "/data"))
        # describe() shows the path, never the fd
        assert out[2].describe() == ops[2].describe() == [f"bind {base}/data -> /data  # -B"]
    finally:
        for op in out:
            if getattr(op, "fd", None) is not None:
                os.close(op.fd)
    assert pin_sources([Bind("/a", "/a")]) == [Bind("/a", "/a")]       # no session


def test_describe_lines():
    """Each op's own describe(): the lines --dry-run has always printed."""
    from hpcimage.image import Image
    p = Plan()
    p.warnings.append("w")
    p.notes.append("n")
    for op in (UserNs(1000, 100), Private(), Session("/s"),
               MountImage(Image("/i/x.sif", "sif", offset=4096), "/s/image"),
               RootFs("/s/image", "/s/root", ["/proc", "/a b"]),
               IdentityFiles("/s", "/s/image", 1000, 100, "u", "/home/u", "", "", "g"),
               Bind("/h", "/c", True, "-B", "/s/root"), Remount("/s/root"), Pivot("/s/root"),
               Chdir("/w", "/home/u", False, "system", "image-exec"),
               Exec("run", ["a"], {"K": "v w"}, {"F": "1"}, "/p", None, "image-run")):
        p.add(op)
    assert p.describe() == (
        "# warning: w\n"
        "# note: n\n"
        "userns 1000 100\n"
        "private /\n"
        "session /s\n"
        "image /i/x.sif -> /s/image  # sif, the squashfs partition at offset 4096\n"
        "rootfs /s/image -> /s/root  # mount points: /proc 'a b'\n".replace("'a b'", "'/a b'")
        + "files /s/passwd /s/group  # the image's, plus user u (1000:100, home /home/u, "
        "shell /bin/sh) and group g\n"
        "bind /h -> /c ro  # -B\n"
        "readonly /s/root\n"
        "pivot /s/root\n"
        "chdir /w  # the image's own (a system directory is not bound), else /home/u, "
        "else /\n"
        "exec /.singularity.d/runscript a  # after /.singularity.d/env/*.sh when the image "
        "has them\n"
        "  env K='v w'\n"
        "  env F=1  # forced, after the env scripts\n"
        "  prepend PATH /p  # after the env scripts\n")
