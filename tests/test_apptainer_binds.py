"""Binds as Apptainer's (issue 14 §4), as the test user meets them through image-exec
and `hpcimage exec`: backslash escapes (-B, *_BIND, site.yaml), the options after
the destination (ro, rw, image-src=, id=) with image files bound as data (SquashFS,
ext3, a SIF's data partition), a relative source, the default binds (/var/tmp,
/etc/localtime, /etc/hosts, /etc/resolv.conf, home, cwd, /tmp) and --no-mount.
Plan-level checks (no container) where cheaper."""
import json
import os
import shutil
import subprocess
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))
from conftest import cli_argv, runtime_argv  # noqa: E402

from hpcimage.config import bindspec  # noqa: E402
from hpcimage.config.policy import Policy  # noqa: E402
from hpcimage.errors import UsageError  # noqa: E402
from hpcimage.image import open_image  # noqa: E402
from hpcimage.runtime import options  # noqa: E402
from hpcimage.runtime.ops import Bind, MountData  # noqa: E402
from hpcimage.runtime.plan import plan  # noqa: E402
from hpcimage.runtime.request import Request  # noqa: E402

HOWS = ("image-exec", "hpcimage exec")


def run(user, how, image, *cmd, opts=(), env=None, cwd=None):
    """The command in image through image-exec (the module's wrapper) or `hpcimage
    exec IMAGE`."""
    if how == "image-exec":
        e = {"HPCIMAGE_IMAGE": str(image)}
        e.update(env or {})
        return user.run(runtime_argv("image-exec", *opts, *cmd), env=e, cwd=cwd)
    return user.run(cli_argv("exec", *opts, str(image), *cmd), env=env, cwd=cwd)


def ok(r):
    assert r.returncode == 0, (r.returncode, r.stdout, r.stderr)
    return r.stdout


def bad(r, msg, status=2):
    assert r.returncode == status, (r.returncode, r.stdout, r.stderr)
    assert msg in r.stderr, r.stderr
    assert r.stderr.count("\n") == 1, r.stderr        # one line
    return r.stderr


@pytest.fixture
def odd_dirs(userdir, user):
    """Host directories whose names hold ',' and ':' (and a backslash), each with a
    file naming it."""
    out = {}
    for name in ("dir,with,commas", "a:b", "c,d:e"):
        d = userdir / name
        d.mkdir()
        (d / "id").write_text(name + "\n")
        os.chown(d, user.uid, user.gid)
        os.chown(d / "id", user.uid, user.gid)
        out[name] = d
    return out


def esc(path):
    return str(path).replace("\\", "\\\\").replace(",", "\\,").replace(":", "\\:")


# ------------------------------------------------------------------ the grammar

@pytest.mark.parametrize("text,specs", [
    ("a,b", ["a", "b"]),
    ("a:/b:ro,image-src=/x,c", ["a:/b:ro,image-src=/x", "c"]),
    ("a:/b:ro,rw", ["a:/b:ro,rw"]),
    ("dir\\,x:/d,e", ["dir\\,x:/d", "e"]),
    (" a , b:/c ,", ["a", "b:/c"]),
    ("a:/b,ro", ["a:/b", "ro"]),           # no options field: 'ro' is the next source
])
def test_split_list(text, specs):
    assert bindspec.split_list(text) == specs


@pytest.mark.parametrize("spec,want", [
    ("dir\\,with\\,commas:/data", ("dir,with,commas", "/data", False, None, None)),
    ("a\\:b:/x", ("a:b", "/x", False, None, None)),
    ("a:/x\\:y:ro", ("a", "/x:y", True, None, None)),
    ("back\\\\slash", ("back\\slash", None, False, None, None)),
    ("odd\\q", ("odd\\q", None, False, None, None)),
    ("f.sif:/d:id=3", ("f.sif", "/d", False, "/", 3)),
    ("f.img:/d:rw,image-src=/in\\,x", ("f.img", "/d", False, "/in,x", None)),
    ("f.img:/d:image-src=", ("f.img", "/d", False, "/", None)),
])
def test_parse(spec, want):
    b = bindspec.parse(spec)
    assert (b.src, b.dst, b.ro, b.image_src, b.part_id) == want


@pytest.mark.parametrize("spec,msg", [
    (":/x", "missing source"),
    ("a:/x:rx", "unknown option 'rx'"),
    ("a:/x:", "empty option"),
    ("a:/x:ro,rw", "conflicts"),
    ("a:/x:id=0", "id must be a partition number above 0"),
    ("a:/x:id=one", "id must be a partition number above 0"),
    ("a:/x:image-src=rel", "image-src must be an absolute path"),
    ("a:/x:ro:more", "too many ':'"),
    ("a:rel", "destination must be an absolute path"),
])
def test_parse_errors(spec, msg):
    with pytest.raises(ValueError, match=msg):
        bindspec.parse(spec)


def test_options_splits_with_the_grammar():
    o = options.parse(["exec", "-B", "a\\,b:/x:ro,image-src=/y,c", "--no-mount", "tmp,cwd",
                       "--no-mount", "/etc/hosts", "img", "true"], {})
    assert o.binds == ["a\\,b:/x:ro,image-src=/y", "c"]
    assert o.no_mount == ["tmp", "cwd", "/etc/hosts"]


# ------------------------------------------------------------------ escapes, by every route

@pytest.mark.parametrize("how", HOWS)
def test_escaped_comma_and_colon_in_bind(user, demo_sqfs, odd_dirs, how):
    spec = ",".join(f"{esc(d)}:/m{i}" for i, d in enumerate(odd_dirs.values()))
    out = ok(run(user, how, demo_sqfs, "cat", "/m0/id", "/m1/id", "/m2/id",
                 opts=("-B", spec)))
    assert out == "dir,with,commas\na:b\nc,d:e\n"
    # a path holding ':' bound at its own path (no destination given)
    d = odd_dirs["a:b"]
    assert ok(run(user, how, demo_sqfs, "cat", f"{d}/id", opts=("-B", esc(d)))) == "a:b\n"


@pytest.mark.parametrize("var", ["APPTAINER_BIND", "SINGULARITY_BIND"])
def test_escapes_in_bind_variables(user, demo_sqfs, odd_dirs, var):
    d1, d2 = odd_dirs["dir,with,commas"], odd_dirs["c,d:e"]
    env = {var: f"{esc(d1)}:/one:ro,{esc(d2)}:/two"}
    out = ok(run(user, "image-exec", demo_sqfs, "sh", "-c",
                 "cat /one/id /two/id; touch /one/x 2>/dev/null && echo rw || echo ro",
                 env=env))
    assert out == "dir,with,commas\nc,d:e\nro\n"


def test_escapes_in_site_binds(user, demo_sqfs, odd_dirs, userdir):
    """site.yaml -> generate's site.json -> the runtime: the spec travels verbatim."""
    from hpcimage.config import site as sitemod
    d = odd_dirs["c,d:e"]
    site_yaml = userdir / "site.yaml"
    site_yaml.write_text(
        "store: /s\nbinds:\n  - " + json.dumps(f"{esc(d)}:/sitebind:ro") + "\nimages: []\n")
    s = sitemod.load(str(site_yaml))
    assert [(b.src, b.dst, b.mode) for b in s.binds] == [(str(d), "/sitebind", "ro")]
    policy = userdir / "site.json"
    policy.write_text(json.dumps(s.policy()))          # what generate writes
    os.chmod(policy, 0o644)
    out = ok(run(user, "image-exec", demo_sqfs, "cat", "/sitebind/id",
                 env={"HPCIMAGE_SITE_CONFIG": str(policy)}))
    assert out == "c,d:e\n"


@pytest.mark.parametrize("entry,msg", [
    ("/a,/b", "one bind per entry"),
    ("/a:/b:rx", "unknown option 'rx'"),
])
def test_site_bind_errors(tmp_path, entry, msg):
    from hpcimage.config import site as sitemod
    p = tmp_path / "site.yaml"
    p.write_text("store: /s\nbinds: [" + json.dumps(entry) + "]\nimages: []\n")
    with pytest.raises(UsageError, match=msg):
        sitemod.load(str(p))


# ------------------------------------------------------------------ options, image binds

@pytest.mark.parametrize("how", HOWS)
def test_ro_and_rw(user, demo_sqfs, userdir, how):
    r = run(user, how, demo_sqfs, "sh", "-c", "touch /r/a 2>/dev/null && echo w || echo r; "
            "touch /w/b && echo w", opts=("-B", f"{userdir}:/r:ro,{userdir}:/w:rw"))
    assert ok(r) == "r\nw\n"
    assert (userdir / "b").exists() and not (userdir / "a").exists()


@pytest.mark.parametrize("how", HOWS)
def test_relative_source_binds_at_its_absolute_path(user, demo_sqfs, userdir, how):
    (userdir / "rel").mkdir()
    (userdir / "rel" / "f").write_text("here\n")
    os.chown(userdir / "rel", user.uid, user.gid)
    out = ok(run(user, how, demo_sqfs, "cat", f"{userdir}/rel/f", opts=("-B", "rel"),
                 cwd=str(userdir)))
    assert out == "here\n"


def _data_tree(path, user):
    (path / "sub").mkdir(parents=True)
    (path / "sub" / "f.txt").write_text("data\n")
    (path / "top.txt").write_text("top\n")
    subprocess.run(["chown", "-R", f"{user.uid}:{user.gid}", str(path)], check=True)


@pytest.fixture
def data_images(userdir, user):
    """A SquashFS file, an ext3 file (owned by the user: rw binds write) and a SIF
    with both as data partitions (ids 1 and 2)."""
    tree = userdir / "tree"
    _data_tree(tree, user)
    sqfs, ext3 = userdir / "data.sqfs", userdir / "data.ext3"
    subprocess.run(["mksquashfs", str(tree), str(sqfs), "-noappend", "-quiet",
                    "-no-progress"], check=True, stdout=subprocess.DEVNULL)
    subprocess.run(["mke2fs", "-q", "-F", "-t", "ext3", "-d", str(tree),
                    "-E", f"root_owner={user.uid}:{user.gid}", str(ext3), "4M"], check=True)
    for f in (sqfs, ext3):
        os.chown(f, user.uid, user.gid)
    return {"sqfs": sqfs, "ext3": ext3, "tree": tree}


needs_fuse2fs = pytest.mark.skipif(shutil.which("fuse2fs", path="/usr/bin:/bin:/usr/sbin:/sbin")
                                   is None, reason="fuse2fs not installed (scripts/setup.sh)")


@pytest.mark.parametrize("how", HOWS)
def test_image_src_squashfs(user, demo_sqfs, data_images, how):
    out = ok(run(user, how, demo_sqfs, "sh", "-c",
                 "cat /d/f.txt /all/top.txt; touch /d/x 2>/dev/null && echo w || echo r",
                 opts=("-B", f"{data_images['sqfs']}:/d:image-src=/sub",
                       "-B", f"{data_images['sqfs']}:/all:image-src=/")))
    assert out == "data\ntop\nr\n"


@needs_fuse2fs
@pytest.mark.parametrize("how", HOWS)
def test_image_src_ext3(user, demo_sqfs, data_images, how):
    ext3 = data_images["ext3"]
    out = ok(run(user, how, demo_sqfs, "sh", "-c",
                 "cat /e/f.txt; echo new > /e/new.txt && echo wrote; "
                 "touch /ero/x 2>/dev/null && echo w || echo r",
                 opts=("-B", f"{ext3}:/e:image-src=/sub,{ext3}:/ero:ro,image-src=/")))
    assert out == "data\nwrote\nr\n"


@needs_fuse2fs
def test_image_bind_mount_failures(user, demo_sqfs, data_images, userdir):
    """A file that looks like ext3 but is not one, and no fuse2fs on the node: one
    line, exit 1 (a failed operation), nothing left running."""
    broken = userdir / "broken.ext3"
    raw = bytearray(4096)
    raw[1080:1082] = b"\x53\xef"
    broken.write_bytes(bytes(raw))
    os.chown(broken, user.uid, user.gid)
    bad(run(user, "image-exec", demo_sqfs, "true", opts=("-B", f"{broken}:/x:image-src=/")),
        f"{broken}: cannot mount ext3 image with fuse2fs", status=1)
    empty = userdir / "nofuse2fs"
    empty.mkdir()
    bad(run(user, "image-exec", demo_sqfs, "true",
            opts=("-B", f"{data_images['ext3']}:/x:image-src=/"), env={"PATH": str(empty)}),
        "fuse2fs not found: install fuse2fs to bind from ext3 images", status=1)


def test_id_selects_a_sif_partition(user, demo_sqfs, data_images, userdir):
    """id=N: the SIF partition with object id N (here the primary one, a SquashFS);
    without id a SIF binds its first data partition, and this one has none."""
    from hpcimage.image import sif as sifmod
    sif = userdir / "data.sif"
    sifmod.write_sif(str(sif), str(data_images["sqfs"]))
    os.chown(sif, user.uid, user.gid)
    part = sifmod.open_sif(str(sif)).primary_partition().id
    r = run(user, "image-exec", demo_sqfs, "cat", "/d/sub/f.txt",
            opts=("-B", f"{sif}:/d:id={part}"))
    assert ok(r) == "data\n"
    bad(run(user, "image-exec", demo_sqfs, "true", opts=("-B", f"{sif}:/d:id=99")),
        "has no partition with id 99")
    bad(run(user, "image-exec", demo_sqfs, "true", opts=("-B", f"{sif}:/d:image-src=/")),
        "no data partition found")


@pytest.mark.parametrize("how", HOWS)
@pytest.mark.parametrize("spec,msg", [
    ("{userdir}:/x:nope", "unknown option 'nope'"),
    (":/x", "missing source"),
    ("/no/such/src:/x", "bind source /no/such/src does not exist"),
    ("{userdir}:/x:image-src=/", "is a directory, not an image file"),
    ("{userdir}/plain:/x:image-src=/", "is not an image file"),
    ("{sqfs}:/x:id=2", "is a squashfs file, not a SIF"),
    ("{sqfs}:/x:image-src=/nope", "image-src /nope: no such path in the image"),
])
def test_bind_errors(user, demo_sqfs, data_images, userdir, how, spec, msg):
    (userdir / "plain").write_text("not an image\n")
    spec = spec.format(userdir=userdir, sqfs=data_images["sqfs"])
    bad(run(user, how, demo_sqfs, "true", opts=("-B", spec)), msg)


# ------------------------------------------------------------------ default binds, --no-mount

DEFAULTS_SH = ("for p in /var/tmp /etc/localtime /etc/hosts /etc/resolv.conf /tmp \"$HOME\" "
               "\"$PWD\"; do [ -e \"$p\" ] && echo \"$p yes\" || echo \"$p no\"; done; "
               "cmp -s /etc/localtime /host-localtime && echo localtime-host; "
               "cat /var/tmp/{mark} 2>/dev/null; true")


@pytest.fixture
def vartmp_mark(user):
    name = f"hpcimage-binds-{os.getpid()}"
    path = f"/var/tmp/{name}"
    with open(path, "w") as f:
        f.write("vartmp-host\n")
    os.chmod(path, 0o644)
    yield name
    os.unlink(path)


@pytest.mark.parametrize("how", HOWS)
def test_default_binds(user, demo_sqfs, userdir, vartmp_mark, how):
    """/var/tmp and /etc/localtime are the host's (the demo image has neither)."""
    sh = DEFAULTS_SH.format(mark=vartmp_mark)
    out = ok(run(user, how, demo_sqfs, "sh", "-c", sh, cwd=str(userdir),
                 opts=("-B", "/etc/localtime:/host-localtime")))
    lines = out.splitlines()
    assert lines[:7] == ["/var/tmp yes", "/etc/localtime yes", "/etc/hosts yes",
                         "/etc/resolv.conf yes", "/tmp yes", f"{user.home} yes",
                         f"{userdir} yes"], out
    assert lines[7:] == ["localtime-host", "vartmp-host"], out


@pytest.mark.parametrize("how", HOWS)
def test_no_mount_each(user, demo_sqfs, userdir, vartmp_mark, how):
    sh = DEFAULTS_SH.format(mark=vartmp_mark)
    out = ok(run(user, how, demo_sqfs, "sh", "-c", sh, cwd=str(userdir),
                 opts=("--no-mount", "tmp,home,cwd", "--no-mount",
                       "/etc/localtime,/etc/hosts,/etc/resolv.conf",
                       "-B", "/etc/localtime:/host-localtime")))
    # the demo image has no /var/tmp, /etc/localtime, /etc/hosts, /etc/resolv.conf; /tmp
    # is its own (empty), home and cwd are not there (the command runs in /)
    assert out.splitlines() == ["/var/tmp no", "/etc/localtime no", "/etc/hosts no",
                                "/etc/resolv.conf no", "/tmp yes", f"{user.home} no",
                                "/ yes"], out
    assert "vartmp-host" not in out and "localtime-host" not in out
    r = run(user, how, demo_sqfs, "sh", "-c", "ls /tmp | wc -l; echo $PWD", cwd=str(userdir),
            opts=("--no-mount", "tmp,cwd"))
    assert ok(r).split() == ["0", user.home]


@pytest.mark.parametrize("how", HOWS)
def test_no_mount_var_tmp_by_path(user, demo_sqfs, userdir, vartmp_mark, how):
    """--no-mount /var/tmp (a default bind's path) drops that one: /tmp stays bound."""
    sh = DEFAULTS_SH.format(mark=vartmp_mark)
    out = ok(run(user, how, demo_sqfs, "sh", "-c", sh, cwd=str(userdir),
                 opts=("--no-mount", "/var/tmp")))
    lines = out.splitlines()
    assert lines[0] == "/var/tmp no" and lines[4] == "/tmp yes", out
    assert "vartmp-host" not in out
    # --no-mount /tmp: the image's own /tmp (read-only here), not the host's
    r = run(user, how, demo_sqfs, "sh", "-c", f"ls -A /tmp; ls /var/tmp/{vartmp_mark}",
            cwd=user.home, opts=("--no-mount", "/tmp"))
    assert ok(r) == f"/var/tmp/{vartmp_mark}\n"


@pytest.mark.parametrize("how", HOWS)
def test_no_mount_proc_sys_dev(user, demo_sqfs, how):
    out = ok(run(user, how, demo_sqfs, "sh", "-c",
                 "ls /proc | wc -l; ls /sys | wc -l; ls /dev | wc -l",
                 opts=("--no-mount", "proc,sys,dev")))
    assert out.split() == ["0", "0", "0"], out


@pytest.mark.parametrize("how", HOWS)
def test_no_mount_unknown_name(user, demo_sqfs, how):
    bad(run(user, how, demo_sqfs, "true", opts=("--no-mount", "bogus")),
        "--no-mount bogus: not a mount hpcimage can leave out")


def test_contain_keeps_its_meaning(user, demo_sqfs, userdir, vartmp_mark):
    """--contain: fresh /tmp and /var/tmp, empty home, no cwd; the host's /etc files
    stay (as Apptainer's)."""
    out = ok(run(user, "image-exec", demo_sqfs, "sh", "-c",
                 f"ls -A /var/tmp /tmp $HOME | grep -v : | grep -c .; cat /var/tmp/{vartmp_mark} "
                 "2>/dev/null; [ -e /etc/localtime ] && echo lt; [ -e /etc/hosts ] && echo h",
                 opts=("--contain",), cwd=str(userdir)))
    assert out.split() == ["0", "lt", "h"], out


# ------------------------------------------------------------------ the plan (no container)

@pytest.fixture
def sess(tmp_path):
    s = tmp_path / "sess"
    s.mkdir()
    home = tmp_path / "home"
    home.mkdir()
    return str(s), str(home), str(tmp_path)


def make(argv, sess, site=None, env=None):
    base, home, cwd = sess
    e = {"PATH": "/usr/bin:/bin", "HOME": home}
    e.update(env or {})
    opts = options.parse(argv, e)
    return plan(Request(opts, open_image(opts.image), e, base, Policy.from_json(site or {}),
                        uid=1234, gid=567, user="u", home=home, cwd=cwd))


def test_plan_site_binds_and_no_mount(sess, demo_dir, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    site = {"binds": [f"{a}:/sa", f"{b}:/sb:ro"]}
    dsts = lambda p: [x.dst for x in p.ops if type(x) is Bind]        # noqa: E731
    p = make(["exec", str(demo_dir), "true"], sess, site)
    assert {"/sa", "/sb", "/var/tmp", "/etc/localtime", "/etc/hosts"} <= set(dsts(p))
    p = make(["exec", "--no-mount", "/sa", str(demo_dir), "true"], sess, site)
    assert "/sa" not in dsts(p) and "/sb" in dsts(p)
    p = make(["exec", "--no-mount", "bind-paths", str(demo_dir), "true"], sess, site)
    assert not {"/sa", "/sb", "/etc/localtime", "/etc/hosts"} & set(dsts(p))
    assert "/etc/resolv.conf" in dsts(p)
    p = make(["exec", "--no-mount", "hostfs", str(demo_dir), "true"], sess, site)
    assert "/sa" in dsts(p)                     # hostfs: hpcimage mounts none anyway


def test_plan_dry_run_shows_image_binds(sess, demo_dir, demo_sqfs):
    p = make(["exec", "-B", f"{demo_sqfs}:/d:image-src=/etc", str(demo_dir), "true"], sess)
    base = sess[0]
    mounts = [op for op in p.ops if type(op) is MountData]
    assert len(mounts) == 1 and mounts[0].at == base + "/data-images/0" and mounts[0].ro
    b = [op for op in p.ops if type(op) is Bind and op.dst == "/d"][0]
    assert b.src == base + "/data-images/0/etc" and b.ro
    text = p.describe()
    assert f"data {demo_sqfs} -> {base}/data-images/0 ro  # squashfs, for image-src=/etc" in text
    assert f"bind {base}/data-images/0/etc -> /d ro" in text
    # the data mount comes before the root is built
    names = [op.name for op in p.ops]
    assert names.index("data") < names.index("rootfs")
