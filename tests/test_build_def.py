"""`hpcimage build OUT DEF` as the non-root test user: the site's images/ (Demo offline,
Debian 12 with debootstrap), every section and two SCI-F apps, docker-archive and
oci-archive with whiteouts, a push-then-build through a local registry (token auth,
manifest lists, digest checks, ORAS SIF), failures that leave nothing behind, and
`--app` at run time."""
import hashlib
import json
import os
import shutil
import subprocess
import textwrap
from pathlib import Path

import pytest

from conftest import PY, _cached, cli_argv, readable
import registry as reg

IMAGES = readable("images")           # the test user may not read the checkout


def write(path, text, user=None, mode=0o644):
    path = Path(path)
    path.write_text(textwrap.dedent(text).lstrip("\n"))
    path.chmod(mode)
    if user:
        os.chown(path, user.uid, user.gid)
    return path


def build(user, userdir, out, definition, *opts, env=None, ok=True, timeout=600):
    r = user.run(cli_argv("build", *opts, str(out), str(definition)), cwd=str(userdir),
                 env=env, timeout=timeout)
    if ok:
        assert r.returncode == 0, r.stderr
    return r


def hrun(user, *args, **kw):
    return user.run(cli_argv(*args), **kw)


def numeric_listing(sqfs):
    """{path: 'uid/gid'} of a SquashFS image, as stored (not as a container shows it)."""
    out = subprocess.run(["unsquashfs", "-lln", str(sqfs)], capture_output=True,
                         text=True, check=True).stdout
    res = {}
    for ln in out.splitlines():
        parts = ln.split()
        if len(parts) >= 6 and parts[-1].startswith("squashfs-root"):
            p = parts[-1][len("squashfs-root"):] or "/"
            if "->" in parts:
                p = parts[parts.index("->") - 1][len("squashfs-root"):]
            res[p] = parts[1]
    return res


def leftovers(*dirs):
    found = []
    for d in dirs:
        for n in os.listdir(d):
            if ".build-" in n or ".tmp-" in n:
                found.append(os.path.join(d, n))
    return found


# ------------------------------------------------------------------ images/Demo.def

def test_demo_def_offline(user, userdir):
    out = userdir / "Demo-1.0.sqfs"
    r = build(user, userdir, out, IMAGES / "Demo.def")
    assert "running %test" in r.stderr
    assert out.stat().st_uid == user.uid
    r = hrun(user, "run", str(out))
    assert r.returncode == 0 and r.stdout == "Hello from hpcimage Demo 1.0 (busybox)\n", r.stderr
    r = hrun(user, "exec", str(out), "sh", "-c", 'echo "$DEMO_IMAGE:$PATH"; demo-hello hi; '
             "cat /etc/os-release /.singularity.d/runscript.help")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].startswith("1:/opt/demo/bin:")
    assert lines[1] == "demo-hello: hi"
    assert 'NAME="hpcimage Demo"' in lines and "Demo 1.0: a busybox demo image." in r.stdout
    # what hpcimage.imagebuild.busybox demo() writes, the definition file reproduces
    from hpcimage.imagebuild import busybox
    ref = userdir / "ref"
    busybox.demo(str(ref))
    got = subprocess.run(["unsquashfs", "-cat", str(out), "etc/os-release"],
                         capture_output=True, text=True).stdout
    assert got == (ref / "etc/os-release").read_text()
    labels = json.loads(subprocess.run(["unsquashfs", "-cat", str(out), ".singularity.d/labels.json"],
                                       capture_output=True, text=True).stdout)
    assert labels["org.label-schema.name"] == "Demo" and labels["org.label-schema.version"] == "1.0"
    owners = numeric_listing(out)
    assert owners["/bin/busybox"] == "0/0" and owners["/opt/demo/bin/demo-hello"] == "0/0"
    assert not leftovers(userdir, "/tmp")


def test_outputs_sif_sandbox_force(user, userdir):
    sif = userdir / "demo.sif"
    build(user, userdir, sif, IMAGES / "Demo.def", "--notest")
    r = hrun(user, "sif", "list", str(sif))
    assert "Def.FILE" in r.stdout and "JSON.Labels" in r.stdout and "FS (Squashfs" in r.stdout, r.stdout
    r = hrun(user, "inspect", "--deffile", str(sif))
    assert "Bootstrap: busybox" in r.stdout
    assert hrun(user, "run", str(sif)).stdout.startswith("Hello from hpcimage Demo")
    # refused without --force, kept intact; --force replaces it
    before = sif.read_bytes()
    r = build(user, userdir, sif, IMAGES / "Demo.def", ok=False)
    assert r.returncode == 2 and "already exists" in r.stderr
    assert sif.read_bytes() == before
    build(user, userdir, sif, IMAGES / "Demo.def", "--force", "--build-arg", "VERSION=2.0")
    assert hrun(user, "run", str(sif)).stdout == "Hello from hpcimage Demo 2.0 (busybox)\n"
    box = userdir / "box"
    build(user, userdir, box, IMAGES / "Demo.def", "--sandbox")
    assert (box / ".singularity.d/runscript").is_file()
    assert hrun(user, "run", str(box)).stdout.startswith("Hello from hpcimage Demo 1.0")
    assert not leftovers(userdir)
    r = build(user, userdir, userdir / "x.img", IMAGES / "Demo.def", ok=False)
    assert r.returncode == 2 and "cannot tell the image format" in r.stderr


# ----------------------------------------------------------- images/Debian-12.def

def _need_mirror():
    import urllib.request
    try:
        urllib.request.urlopen("http://deb.debian.org/debian/dists/bookworm/Release",
                               timeout=10).close()
    except OSError as e:
        pytest.skip(f"no Debian mirror reachable: {e}")


def _debian_def_sqfs(user):
    """images/Debian-12.def built by the test user (debootstrap in a user namespace),
    cached by the definition's hash."""
    h = hashlib.sha256((IMAGES / "Debian-12.def").read_bytes()).hexdigest()[:12]

    def make(path):
        _need_mirror()
        work = Path("/tmp/hpcimage-tests") / f"debian-def-{h}"
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        os.chown(work, user.uid, user.gid)
        r = user.run(cli_argv("build", str(work / "d.sqfs"), str(IMAGES / "Debian-12.def")),
                     cwd=str(work), timeout=900)
        if r.returncode != 0:
            shutil.rmtree(work, ignore_errors=True)
            raise AssertionError(r.stderr)
        shutil.copy(work / "d.sqfs", path)
        shutil.rmtree(work, ignore_errors=True)
    return _cached(f"debian12-def-{h}.sqfs", make)


@pytest.mark.network
def test_debian_def_debootstrap_unprivileged(user, userdir):
    img = _debian_def_sqfs(user)
    r = hrun(user, "exec", str(img), "sh", "-c",
             '. /etc/os-release; echo "$VERSION_ID $HPCIMAGE_DEBIAN_ENV $LC_ALL"; '
             "dpkg-query -W -f='${Package}\\n' apt")
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == ["12 1 C.UTF-8", "apt"]
    owners = numeric_listing(img)
    # subordinate ids kept the owners that packages set (apt's _apt, group shadow)
    assert owners["/usr/bin/apt"] == "0/0"
    assert "42" in {o.split("/")[0] for o in owners.values()} | {o.split("/")[1] for o in owners.values()}
    assert hrun(user, "run", str(img), "-c", "echo bash $BASH_VERSION").stdout.startswith("bash 5")


@pytest.mark.network
def test_apt_get_in_post_on_localimage(user, userdir, debian_dir):
    """%post apt-get install in a Debian base (conftest's cached debootstrap tree, a
    `localimage`), as the user mapped to root with subordinate ids."""
    definition = f"""
        Bootstrap: localimage
        From: {debian_dir}

        %post
            export DEBIAN_FRONTEND=noninteractive
            apt-get -q update
            apt-get -q install -y --no-install-recommends hello
            apt-get clean
            rm -rf /var/lib/apt/lists/*
            chown 1234:4321 /opt
            stat -c '%u:%g' /opt > /opt-owner

        %test
            hello | grep -q 'Hello, world!'
    """
    h = hashlib.sha256(definition.encode()).hexdigest()[:12]

    def make(path):
        _need_mirror()
        d = write(userdir / "apt.def", definition, user)
        r = build(user, userdir, userdir / "apt.sqfs", d, ok=False, timeout=900)
        assert r.returncode == 0, r.stderr[-3000:]
        shutil.copy(userdir / "apt.sqfs", path)
    img = _cached(f"debian12-apt-hello-{h}.sqfs", make)
    r = hrun(user, "exec", str(img), "sh", "-c", "hello; cat /opt-owner")
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == ["Hello, world!", "1234:4321"]
    owners = numeric_listing(img)
    assert owners["/opt"] == "1234/4321" and owners["/usr/bin/hello"] == "0/0"


# ------------------------------------------------------- every section, two apps

EVERY = """
    Bootstrap: busybox
    Stage: builder

    %post
        mkdir -p /build
        echo built-in-stage-one > /build/artifact.txt

    Bootstrap: localimage
    From: {base}
    Stage: final

    %arguments
        GREETING=hello
        WHO=world

    %setup
        echo "setup ran on the host" > "$HPCIMAGE_ROOTFS/setup.txt"
        test "$APPTAINER_ROOTFS" = "$HPCIMAGE_ROOTFS"
        test "$SINGULARITY_ROOTFS" = "$HPCIMAGE_ROOTFS"
        test ! -e "$HPCIMAGE_ROOTFS/opt/hostfile.txt"
        touch setup-was-here

    %files
        hostfile.txt /opt/hostfile.txt
        'dir with space' /opt/spaced

    %files from builder
        /build/artifact.txt /opt/artifact.txt

    %post
        test -f /opt/hostfile.txt
        test -f /scif/apps/foo/data/hostfile.txt
        test -z "${{SECTION_ENV:-}}"
        echo "{{{{ GREETING }}}} {{{{ WHO }}}}" > /opt/greeting
        chown 1234:4321 /opt/greeting
        echo 'export FROM_POST=yes' >> "$APPTAINER_ENVIRONMENT"
        echo 'post.label from-post' >> "$APPTAINER_LABELS"
        id -u > /opt/post-uid

    %environment
        export SECTION_ENV=env-{{{{ WHO }}}}

    %runscript
        echo "runscript args: $*"

    %startscript
        echo started

    %test
        grep -q "{{{{ GREETING }}}} {{{{ WHO }}}}" /opt/greeting
        test "$SECTION_ENV" = env-{{{{ WHO }}}}
        test "$FROM_POST" = yes

    %labels
        Maintainer hpc-team@example.org
        Version 2.0

    %help
        This image has every section.

    %appinstall foo
        printf '#!/bin/sh\\necho foo-tool ran\\n' > bin/foo-tool
        chmod 755 bin/foo-tool
        echo "$SCIF_APPNAME" > installed-by

    %apprun foo
        echo "foo runs as $SCIF_APPNAME with $FOO_ENV: $*"

    %appenv foo
        export FOO_ENV=foo-value

    %applabels foo
        Flavor sweet

    %apphelp foo
        foo helps.

    %appfiles foo
        hostfile.txt data/hostfile.txt

    %apptest foo
        test -x /scif/apps/foo/bin/foo-tool

    %apprun bar
        echo "bar runs as $SCIF_APPNAME"

    %appenv bar
        export BAR_ENV=bar-value
"""


@pytest.fixture(scope="module")
def every_image(tmp_path_factory, bare_dir):
    from conftest import User, USER
    user = User(USER)
    d = Path("/tmp/hpcimage-tests")
    d.mkdir(exist_ok=True)
    work = Path(__import__("tempfile").mkdtemp(dir=d))
    os.chown(work, user.uid, user.gid)
    work.chmod(0o755)
    write(work / "hostfile.txt", "from the host\n", user)
    (work / "dir with space").mkdir()
    write(work / "dir with space" / "inner.txt", "inner\n", user)
    defn = write(work / "every.def", EVERY.format(base=bare_dir), user)
    out = work / "every.sqfs"
    r = build(user, work, out, defn, "--build-arg", "WHO=hpc")
    yield out, work, r
    shutil.rmtree(work, ignore_errors=True)


def test_every_section(user, every_image):
    out, work, r = every_image
    assert "%setup" in r.stderr and "%test" in r.stderr
    assert (work / "setup-was-here").stat().st_uid == user.uid      # %setup: on the host
    assert not (work / "setup.txt").exists()
    r = hrun(user, "exec", str(out), "sh", "-c",
             "cat /setup.txt /opt/hostfile.txt /opt/spaced/inner.txt /opt/artifact.txt "
             "/opt/greeting /opt/post-uid; test ! -e /build && echo no-build-dir; "
             'echo "$SECTION_ENV $FROM_POST ${FOO_ENV:-nofoo} $SCIF_APPROOT_foo"; '
             "cat /.singularity.d/startscript /.singularity.d/runscript.help")
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines()[:9] == [
        "setup ran on the host", "from the host", "inner", "built-in-stage-one",
        "hello hpc", "0", "no-build-dir", "env-hpc yes nofoo /scif/apps/foo", "#!/bin/sh"]
    assert "echo started" in r.stdout and "This image has every section." in r.stdout
    owners = numeric_listing(out)
    assert owners["/opt/greeting"] == "1234/4321" and owners["/opt/hostfile.txt"] == "0/0"
    r = hrun(user, "run", str(out), "a", "b")
    assert r.stdout == "runscript args: a b\n", r.stderr
    labels = json.loads(hrun(user, "exec", str(out), "cat", "/.singularity.d/labels.json").stdout)
    assert labels["Maintainer"] == "hpc-team@example.org" and labels["Version"] == "2.0"
    assert labels["post.label"] == "from-post"
    assert labels["org.label-schema.usage"] == "/.singularity.d/runscript.help"
    deffile = hrun(user, "exec", str(out), "cat", "/.singularity.d/Singularity").stdout
    assert 'echo "hello hpc" > /opt/greeting' in deffile and "Stage: final" in deffile


def test_apps(user, every_image):
    out, _, _ = every_image
    r = hrun(user, "apps", str(out))
    assert r.returncode == 0 and r.stdout == "bar\nfoo\n", r.stderr
    r = hrun(user, "run", "--app", "foo", str(out), "x", "y")
    assert r.returncode == 0 and r.stdout == "foo runs as foo with foo-value: x y\n", r.stderr
    r = hrun(user, "exec", "--app", "foo", str(out), "sh", "-c",
             'echo "$SCIF_APPNAME $SCIF_APPROOT $SCIF_APPDATA $FOO_ENV ${BAR_ENV:-nobar} '
             '$APPTAINER_APPNAME"; foo-tool; cat /scif/apps/foo/installed-by '
             "/scif/apps/foo/data/hostfile.txt /scif/apps/foo/scif/runscript.help")
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == [
        "foo /scif/apps/foo /scif/data/foo foo-value nobar foo",
        "foo-tool ran", "foo", "from the host", "    foo helps."]     # %apphelp verbatim
    r = hrun(user, "exec", "--app", "bar", str(out), "sh", "-c",
             'echo "$SCIF_APPNAME $BAR_ENV ${FOO_ENV:-nofoo}"')
    assert r.stdout == "bar bar-value nofoo\n", r.stderr
    assert hrun(user, "run", "--app", "bar", str(out)).stdout == "bar runs as bar\n"
    labels = json.loads(hrun(user, "exec", str(out), "cat",
                             "/scif/apps/foo/scif/labels.json").stdout)
    assert labels == {"SCIF_APP_NAME": "foo", "Flavor": "sweet"}
    r = hrun(user, "exec", str(out), "sh", "-c", "ls /scif/apps/foo/scif /scif/data/foo")
    assert "test" in r.stdout.split() and "input" in r.stdout.split()
    r = hrun(user, "run", "--dry-run", "--app", "foo", str(out))
    assert "exec /scif/apps/foo/scif/runscript" in r.stdout
    assert "env APPTAINER_APPNAME=foo" in r.stdout
    r = hrun(user, "run", "--app", "nope", str(out))
    assert r.returncode == 2 and "no app 'nope'" in r.stderr
    r = hrun(user, "run", "--app", "../etc", str(out))
    assert r.returncode == 2 and "not an app name" in r.stderr
    # image-run / image-exec: the same runtime with HPCIMAGE_IMAGE
    from conftest import runtime_argv
    r = user.run(runtime_argv("image-run", "--app", "foo", "z"),
                 env={"HPCIMAGE_IMAGE": str(out)})
    assert r.stdout == "foo runs as foo with foo-value: z\n", r.stderr


# ------------------------------------------------------------ failures and errors

@pytest.mark.parametrize("section, status, what", [
    ("%post\n    echo partial > /partial\n    false\n", 1, "t.def:3: %post failed (exit 1)"),
    ("%test\n    false\n", 1, "t.def:3: %test failed (exit 1)"),
    # %test runs while mksquashfs works; a slow failing %test must still stop the rename
    ("%test\n    sleep 1\n    exit 4\n", 1, "t.def:3: %test failed (exit 4)"),
    ("%files\n    no-such-file /x\n", 2, "t.def:4: %files: no-such-file: no such file"),
    ("%setup\n    exit 3\n", 1, "t.def:3: %setup failed (exit 3)"),
    ("%pre\n    exit 5\n", 1, "t.def:3: %pre failed (exit 5)"),
])
def test_failure_leaves_nothing(user, userdir, section, status, what):
    tmp = userdir / "tmp"
    tmp.mkdir()
    os.chown(tmp, user.uid, user.gid)
    d = write(userdir / "t.def", "Bootstrap: busybox\n\n" + section, user)
    for out, opts in ((userdir / "o.sqfs", ()), (userdir / "o.sif", ()),
                      (userdir / "box", ("--sandbox",))):
        r = build(user, userdir, out, d, *opts, env={"TMPDIR": str(tmp)}, ok=False)
        assert r.returncode == status, r.stderr
        assert f"hpcimage: error: {what}" in r.stderr.replace(str(userdir) + "/", "")
        assert not out.exists()
        assert sorted(os.listdir(userdir)) == ["t.def", "tmp"]
        assert os.listdir(tmp) == []


_DEFAULTS = {"sandbox": False, "force": False, "notest": False, "build_args": (),
             "all_": False, "site_path": "site.yaml", "verbose": False,
             "warn_unused": False, "fakeroot": False, "encrypt": False, "passphrase": False,
             "pem_path": None}


@pytest.mark.parametrize("args, want", [
    (["o.sif", "t.def"], {}), (["-F", "o.sif", "t.def"], {"force": True}),
    (["--force", "--notest", "o.sqfs", "t.def"], {"force": True, "notest": True,
                                                  "out": "o.sqfs"}),
    (["-s", "-T", "box", "t.def"], {"sandbox": True, "notest": True}),
    (["--sandbox", "box", "t.def", "--force"], {"sandbox": True, "force": True}),
    (["-sF", "box", "t.def"], {"sandbox": True, "force": True}),
    (["--build-arg", "A=1", "--build-arg=B=2", "o.sif", "t.def"], {"build_args": ("A=1", "B=2")}),
    (["--build-arg", "-x", "o.sif", "t.def"], {"build_args": ("-x",)}),
    (["o.sif", "docker://debian:12"], {"source": "docker://debian:12"}),
    (["-v", "o.sif", "t.def"], {"verbose": True}),
    (["o.sqfs", "--verbose", "t.def"], {"verbose": True, "out": "o.sqfs"}),
    (["--", "o.sif", "t.def"], {}),
    (["--warn-unused-build-args", "o.sif", "t.def"], {"warn_unused": True}),
    (["--site", "s.yaml", "--all"], {"all_": True, "site_path": "s.yaml", "out": None,
                                     "source": None}),
])
def test_build_parser(args, want):
    """`hpcimage build`'s one parser (click's): what each command line means."""
    from hpcimage.cli.sifcli import build as click_build
    kw = {**_DEFAULTS, "out": "o.sif", "source": "t.def"}
    if args[:1] in (["-s"], ["--sandbox"], ["-sF"]):
        kw["out"] = "box"
    assert click_build.make_context("build", list(args)).params == {**kw, **want}


def test_exec_starts_without_click_and_build_with_it(user, userdir):
    """The runtime's front door (`hpcimage exec/run/shell`, the hot path) imports no
    click (-X importtime lists every module imported); `hpcimage build` is a click
    command (its stand-ins for the standard library are gone, issue 13)."""
    d = write(userdir / "t.def", "Bootstrap: busybox\n%post\n    echo hi > /hi\n", user)

    def run(*args):
        return user.run([PY, "-I", "-X", "importtime", "-m", "hpcimage.cli", *args],
                        cwd=str(userdir))

    def imported(stderr):
        return {ln.rsplit("|", 1)[1].strip() for ln in stderr.splitlines()
                if ln.startswith("import time:") and "|" in ln}
    r = run("build", str(userdir / "o.sqfs"), str(d))
    assert r.returncode == 0 and (userdir / "o.sqfs").is_file(), r.stderr
    mods = imported(r.stderr)
    assert "hpcimage.imagebuild.buildcmd" in mods and "click" in mods
    r = run("build", str(userdir / "demo.sqfs"), str(IMAGES / "Demo.def"))
    assert r.returncode == 0 and (userdir / "demo.sqfs").is_file(), r.stderr
    heavy = {"yaml", "jinja2"}
    assert mods & heavy == set() and imported(r.stderr) & heavy == set()
    for verb, args in (("exec", ["true"]), ("run", []), ("shell", [])):
        r = run(verb, "--dry-run", str(userdir / "o.sqfs"), *args)
        assert r.returncode == 0, r.stderr
        mods = imported(r.stderr)
        assert "hpcimage.runtime.plan" in mods and "click" not in mods, verb
    r = user.run(cli_argv("exec", str(userdir / "o.sqfs"), "cat", "/hi"), cwd=str(userdir))
    assert r.returncode == 0 and r.stdout == "hi\n", r.stderr
    r = run("build", "--help")                                    # click's path
    assert r.returncode == 0 and "click" in imported(r.stderr) and "--sandbox" in r.stdout


def test_notest_skips_failing_test(user, userdir):
    d = write(userdir / "t.def", "Bootstrap: busybox\n%test\n    false\n", user)
    r = build(user, userdir, userdir / "o.sqfs", d, "--notest")
    assert "%test" not in r.stderr
    assert (userdir / "o.sqfs").is_file()


def test_malformed_definition_cli(user, userdir):
    d = write(userdir / "bad.def", "Bootstrap: busybox\n\n%post\n  true\n%labels\n  a b\n"
              "%bogus\n", user)
    r = build(user, userdir, userdir / "o.sqfs", d, ok=False)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines()[-1] == \
        f"hpcimage: error: {d}:7: unknown section %bogus (sections: " + \
        r.stderr.split("(sections: ", 1)[1].strip()
    d = write(userdir / "bad2.def", "Bootstrap: yum\nOSVersion: 8\n", user)
    r = build(user, userdir, userdir / "o.sqfs", d, ok=False)
    assert r.returncode == 2 and "bad2.def:1: Bootstrap: yum: yum/dnf/zypper" in r.stderr
    assert not (userdir / "o.sqfs").exists()


def test_single_id_fallback(user, userdir, bare_dir):
    """Without subordinate ids everything belongs to root and chown fails; the build
    itself still works (HPCIMAGE_BUILD_IDMAP=single forces the fallback)."""
    d = write(userdir / "s.def", f"""
        Bootstrap: localimage
        From: {bare_dir}
        %post
            id -u > /uid
            if chown 1234 /uid 2>/dev/null; then echo chowned; else echo no-chown; fi > /chown
    """, user)
    r = build(user, userdir, userdir / "s.sqfs", d, env={"HPCIMAGE_BUILD_IDMAP": "single"})
    assert "single id" in r.stderr
    r = hrun(user, "exec", str(userdir / "s.sqfs"), "cat", "/uid", "/chown")
    assert r.stdout == "0\nno-chown\n", r.stderr


# ------------------------------------------------ docker-archive and oci-archive

def _layers(bare_dir):
    base = reg.dir_layer(bare_dir)
    one = reg.tar_layer([
        ("etc", "dir", None, 0o755),
        ("etc/a.conf", "file", b"a\n", 0o644),
        ("etc/b.conf", "file", b"b\n", 0o644),
        ("data", "dir", None, 0o755),
        ("data/dir", "dir", None, 0o755),
        ("data/dir/old1", "file", b"1\n", 0o644),
        ("data/dir/old2", "file", b"2\n", 0o644),
        ("data/gone", "dir", None, 0o755),
        ("data/gone/x", "file", b"x\n", 0o644),
        ("usr/local/bin", "dir", None, 0o755),
        ("usr/local/bin/tool", "file", b"#!/bin/sh\necho tool v1\n", 0o755),
        ("usr/local/bin/tool-link", "hardlink", "usr/local/bin/tool", 0o755),
        ("escape", "symlink", "/", 0o777),
    ])
    two = reg.tar_layer([
        ("etc/.wh.a.conf", "file", b"", 0o644),
        ("data/dir/new", "file", b"new\n", 0o644),     # before the opaque marker...
        ("data/dir/.wh..wh..opq", "file", b"", 0o644),  # ...and kept by it
        ("data/.wh.gone", "file", b"", 0o644),
        ("usr/local/bin/tool", "file", b"#!/bin/sh\necho tool v2\n", 0o755),
        ("escape/etc/escaped", "file", b"inside\n", 0o644),   # through a symlink: stays in
    ])
    return [base, one, two]


CONFIG = dict(env=["PATH=/usr/local/bin:/usr/bin:/bin", "FOO=bar baz", 'Q=it\'s "q" $x'],
              entrypoint=["/usr/local/bin/tool"], cmd=["default-arg"], workdir="/data",
              labels={"maintainer": "hpc-team", "org.opencontainers.image.version": "3.1"})


@pytest.mark.parametrize("kind", ["docker-archive", "oci-archive"])
def test_archive_whiteouts_and_config(user, userdir, bare_dir, kind):
    cfg = reg.image_config(**CONFIG)
    cfg["config"]["Entrypoint"] = None
    cfg["config"]["Cmd"] = ["/bin/sh", "-c", "echo cmd: $FOO"]
    tarball = userdir / "image.tar"
    if kind == "docker-archive":
        reg.docker_archive(tarball, _layers(bare_dir), cfg)
        src = "image.tar"
    else:
        reg.oci_archive(tarball, _layers(bare_dir), cfg, tag="1.0")
        src = "image.tar:1.0"
    os.chown(tarball, user.uid, user.gid)
    d = write(userdir / "a.def", f"""
        Bootstrap: {kind}
        From: {src}

        %post
            test ! -e /etc/a.conf
            echo post > /post
    """, user)
    out = userdir / "a.sqfs"
    build(user, userdir, out, d)
    r = hrun(user, "exec", str(out), "sh", "-c",
             "ls /etc; ls /data; ls /data/dir; tool; cat /etc/escaped /post; "
             'echo "$FOO|$Q"; tool-link')
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    etc = lines[:lines.index("dir")]
    assert "b.conf" in etc and "a.conf" not in etc and "escaped" in etc
    assert "gone" not in lines and lines[lines.index("dir") + 1] == "new"
    assert "old1" not in lines and "old2" not in lines
    assert "tool v2" in lines and "inside" in lines and "post" in lines
    assert lines[-1] == "tool v1"           # the hard link kept the replaced file
    assert "bar baz|it's \"q\" $x" in lines
    assert not os.path.exists("/etc/escaped")
    r = hrun(user, "run", str(out))
    assert r.stdout == "cmd: bar baz\n", r.stderr
    r = hrun(user, "run", str(out), "echo", "replaced")
    assert r.stdout == "replaced\n"
    meta = hrun(user, "exec", str(out), "cat", "/.singularity.d/labels.json",
                "/.singularity.d/runscript", "/.singularity.d/env/10-docker2singularity.sh").stdout
    assert '"maintainer": "hpc-team"' in meta and "OCI_WORKDIR='/data'" in meta
    assert "export PATH='/usr/local/bin:/usr/bin:/bin'" in meta


def test_archive_entrypoint_and_host_override(user, userdir, bare_dir):
    tarball = userdir / "image.tar"
    reg.docker_archive(tarball, _layers(bare_dir), reg.image_config(**CONFIG))
    d = write(userdir / "a.def", "Bootstrap: docker-archive\nFrom: image.tar\n", user)
    out = userdir / "a.sif"
    build(user, userdir, out, d)
    assert hrun(user, "run", str(out)).stdout == "tool v2\n"
    r = hrun(user, "exec", str(out), "sh", "-c", 'echo "$FOO"', env={"FOO": "from-host"})
    assert r.stdout == "from-host\n"        # as Apptainer: ${FOO:-image value}


# --------------------------------------------------------------- the registry

@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    why = reg.Registry.unavailable()
    if why:
        pytest.skip(why)
    r = reg.Registry(str(tmp_path_factory.mktemp("registry")))
    try:
        r.start()
    except RuntimeError as e:
        pytest.skip(str(e))
    yield r
    r.stop()


def _env(userdir):
    return {"HPCIMAGE_CACHEDIR": str(userdir / "cache")}


def test_registry_push_then_build(user, userdir, bare_dir, registry):
    mine = reg.image_config(**CONFIG)
    other = reg.tar_layer([("etc", "dir", None, 0o755),
                           ("etc/platform", "file", b"arm64\n", 0o644)])
    from hpcimage.image.sif import host_goarch
    arch = host_goarch()
    ours = reg.tar_layer([("etc", "dir", None, 0o755),
                          ("etc/platform", "file", arch.encode() + b"\n", 0o644)])
    layers = _layers(bare_dir)
    foreign = "arm64" if arch != "arm64" else "amd64"
    registry.push_index("hpc/test", "1.0", [
        (foreign, [layers[0], other], reg.image_config(arch=foreign)),
        (arch, layers + [ours], mine)])
    d = write(userdir / "r.def", f"""
        Bootstrap: docker
        From: {registry.host}/hpc/test:1.0

        %runscript
            echo "from the registry: $(cat /etc/platform)"
    """, user)
    out = userdir / "r.sqfs"
    r = build(user, userdir, out, d, env=_env(userdir))
    assert "pulling" in r.stderr
    assert hrun(user, "run", str(out)).stdout == f"from the registry: {arch}\n"
    r = hrun(user, "exec", str(out), "sh", "-c", 'tool; echo "$FOO"')
    assert r.stdout == "tool v2\nbar baz\n", r.stderr
    # cached blobs, owned by the user, named by digest
    blobs = list((userdir / "cache/blobs/sha256").iterdir())
    assert blobs and all(b.stat().st_uid == user.uid for b in blobs)
    assert all(hashlib.sha256(b.read_bytes()).hexdigest() == b.name for b in blobs)
    # by digest, and through a token-auth front (Bearer challenge, like Docker Hub)
    dig = registry.push_image("hpc/plain", "2.0", layers, mine)
    front = reg.TokenFront(registry.url("")).start()
    try:
        d = write(userdir / "t.def", f"Bootstrap: docker\nFrom: {front.host}/hpc/plain@{dig}\n",
                  user)
        build(user, userdir, userdir / "t.sqfs", d, env={"HPCIMAGE_CACHEDIR": str(userdir / "c2")})
        assert front.token_requests and "service=hpcimage-test" in front.token_requests[0]
    finally:
        front.stop()
    assert hrun(user, "run", str(userdir / "t.sqfs")).stdout == "tool v2\n"
    # a registry reference as SOURCE, without a definition file
    r = hrun(user, "build", str(userdir / "u.sif"), f"docker://{registry.host}/hpc/plain:2.0",
             cwd=str(userdir), env=_env(userdir))
    assert r.returncode == 0, r.stderr
    assert hrun(user, "run", str(userdir / "u.sif")).stdout == "tool v2\n"


def test_registry_digest_mismatch(user, userdir, registry):
    evil = reg.tar_layer([("bin", "dir", None, 0o755), ("bin/x", "file", b"good\n", 0o644)])
    registry.push_image("hpc/corrupt", "1.0", [evil], reg.image_config())
    path = registry.blob_file(reg.digest(evil))
    bad = bytearray(Path(path).read_bytes())
    bad[-1] ^= 0xFF
    Path(path).write_bytes(bytes(bad))
    d = write(userdir / "c.def", f"Bootstrap: docker\nFrom: {registry.host}/hpc/corrupt:1.0\n",
              user)
    r = build(user, userdir, userdir / "c.sqfs", d, env=_env(userdir), ok=False)
    assert r.returncode == 1 and "digest mismatch" in r.stderr, r.stderr
    assert not (userdir / "c.sqfs").exists()
    assert not [p for p in (userdir / "cache/blobs/sha256").iterdir()
                if p.name == reg.digest(evil).split(":")[1]]
    d = write(userdir / "m.def", f"Bootstrap: docker\nFrom: {registry.host}/hpc/missing:1.0\n",
              user)
    r = build(user, userdir, userdir / "m.sqfs", d, env=_env(userdir), ok=False)
    assert r.returncode == 1 and "HTTP 404" in r.stderr and "MANIFEST_UNKNOWN" in r.stderr


def test_oras_sif(user, userdir, registry):
    sif = userdir / "demo.sif"
    build(user, userdir, sif, IMAGES / "Demo.def", "--notest")
    registry.push_sif("hpc/demo-sif", "1.0", sif.read_bytes())
    d = write(userdir / "o.def", f"""
        Bootstrap: oras
        From: {registry.host}/hpc/demo-sif:1.0
        %post
            echo extra > /extra
    """, user)
    out = userdir / "o.sqfs"
    build(user, userdir, out, d, env=_env(userdir))
    r = hrun(user, "run", str(out), "cat", "/extra")
    assert r.stdout == "Hello from hpcimage Demo 1.0 (busybox)\nextra\n", r.stderr


# ------------------------------------------------------------ the site's images

def test_build_all_site(user, userdir):
    store = userdir / "store"
    store.mkdir()
    os.chown(store, user.uid, user.gid)
    site = userdir / "site"
    (site / "images").mkdir(parents=True)
    shutil.copy(IMAGES / "Demo.def", site / "images" / "Demo.def")
    write(site / "images" / "Broken-1.def", "Bootstrap: busybox\n%post\n  false\n")
    write(site / "site.yaml", f"""
        store: {store}
        python: /opt/hpcimage/venv/bin/python3
        images:
          - name: Demo
            version: "1.0"
            file: Demo-1.0.sqfs
          - name: Broken
            version: "1"
            file: Broken-1.sqfs
          - name: NoDef
            version: "1"
            file: NoDef-1.sqfs
    """)
    r = hrun(user, "build", "--all", "--site", str(site / "site.yaml"), cwd=str(userdir))
    assert r.returncode == 1, r.stderr
    assert "built 1, skipped 1, failed 1 (Broken/1)" in r.stderr
    # published: the image and its manifest (and the publishers' lock), no build left
    assert sorted(os.listdir(store)) == [".hpcimage.lock", "Demo-1.0.sqfs",
                                         "hpcimage-manifest.json"]
    r = hrun(user, "run", str(store / "Demo-1.0.sqfs"))
    assert r.stdout.startswith("Hello from hpcimage Demo 1.0")
    r = hrun(user, "build", "--all", "--site", str(site / "site.yaml"), "Demo/1.0",
             cwd=str(userdir))
    assert r.returncode == 0 and "exists (--force rebuilds it)" in r.stderr


# ------------------------------------------------ issue 14: built as Apptainer builds

ISSUE14 = """
    Bootstrap: busybox
    Stage: one
    %post
        mkdir -p /data/dir /opt
        echo stage-file > /opt/real
        ln -s /opt/real /data/abs
        ln -s /etc/os-release /data/dir/leak
        echo inner > /data/dir/inner

    Bootstrap: busybox   # a comment after the agent
    Stage: two
    %pre
        echo pre-ran > pre.txt
    %files from one
        /data/abs /got-abs
        /data/dir /got-dir
    %environment
        export FROM_ENV=env-value
    %runscript
    #!/bin/awk -f
    BEGIN { print "awk runscript" }
    %test
    #!/bin/sh -e
    test -f /got-abs
    %labels
        Key  some value
    %help
      Indented help.
"""


@pytest.fixture(scope="module")
def issue14_box(bare_dir):
    from conftest import User, USER
    user = User(USER)
    d = Path("/tmp/hpcimage-tests")
    d.mkdir(exist_ok=True)
    work = Path(__import__("tempfile").mkdtemp(dir=d))
    os.chown(work, user.uid, user.gid)
    work.chmod(0o755)
    defn = write(work / "i14.def", ISSUE14, user)
    box = work / "box"
    r = build(user, work, box, defn, "--sandbox")
    yield box, work, r
    shutil.rmtree(work, ignore_errors=True)


def test_files_from_stage_stay_inside_the_stage(user, issue14_box):
    """%files from STAGE: an absolute link is followed inside the stage's tree, a link
    inside a copied directory stays a link: no file of the build host enters the image
    (the old cp -L copied the host's /etc/os-release through /data/dir/leak)."""
    box, work, r = issue14_box
    assert (box / "got-abs").read_text() == "stage-file\n"
    assert os.path.islink(box / "got-dir" / "leak")
    assert os.readlink(box / "got-dir" / "leak") == "/etc/os-release"
    assert (box / "got-dir" / "inner").read_text() == "inner\n"
    assert (work / "pre.txt").read_text() == "pre-ran\n"            # %pre: on the host


def test_files_from_stage_link_out_of_the_stage_is_refused(user, userdir):
    d = write(userdir / "t.def", """
        Bootstrap: busybox
        Stage: one
        %post
            ln -s /etc/os-release /leak
        Bootstrap: busybox
        %files from one
            /leak /x
        """, user)
    r = build(user, userdir, userdir / "o.sqfs", d, ok=False)
    assert r.returncode == 2, r.stderr
    assert "t.def:7: %files from one: /leak: no such file" in r.stderr
    assert not (userdir / "o.sqfs").exists()


def test_script_sections_keep_their_interpreter(user, issue14_box):
    box, _, _ = issue14_box
    r = hrun(user, "run", str(box))
    assert r.returncode == 0 and r.stdout == "awk runscript\n", r.stderr
    assert (box / ".singularity.d/runscript").read_text().startswith("#!/bin/awk -f\n")
    assert (box / ".singularity.d/test").read_text().startswith("#!/bin/sh -e\n")
    assert (box / ".singularity.d/runscript.help").read_text() == "  Indented help.\n"
    labels = json.loads((box / ".singularity.d/labels.json").read_text())
    assert labels["Key"] == "some value"


def test_built_image_runs_with_only_its_own_files(user, issue14_box):
    """What Apptainer's starter does: /.singularity.d/actions/* with a bare
    environment (env -i), the image's env scripts only."""
    box, _, _ = issue14_box
    meta = box / ".singularity.d"
    for f in ("env/01-base.sh", "env/90-environment.sh", "env/95-apps.sh", "env/99-base.sh",
              "actions/exec", "actions/run", "actions/shell", "actions/start",
              "actions/test"):
        assert os.access(meta / f, os.X_OK), f
    assert (meta / "libs").is_dir() and os.readlink(box / ".exec") == ".singularity.d/actions/exec"
    r = hrun(user, "exec", str(box), "env", "-i", "/bin/sh", "/.singularity.d/actions/exec",
             "sh", "-c", 'echo "$FROM_ENV|$LD_LIBRARY_PATH|$PS1"')
    assert r.stdout == "env-value|/.singularity.d/libs|Apptainer> \n", r.stderr
    r = hrun(user, "exec", str(box), "env", "-i", "LD_LIBRARY_PATH=/x", "/bin/sh",
             "/.singularity.d/actions/exec", "sh", "-c", 'echo "$LD_LIBRARY_PATH"')
    assert r.stdout == "/x:/.singularity.d/libs\n", r.stderr
    r = hrun(user, "exec", str(box), "env", "-i", "/bin/sh", "/.singularity.d/actions/run")
    assert r.stdout == "awk runscript\n", r.stderr
    r = hrun(user, "exec", str(box), "env", "-i", "/bin/sh", "/.singularity.d/actions/test")
    assert r.returncode == 0, r.stderr
    r = hrun(user, "exec", str(box), "env", "-i", "/bin/sh", "/.singularity.d/actions/shell",
             "-c", 'echo "shell $SHELL"')
    assert r.stdout == "shell /bin/sh\n", r.stderr


E2E = Path("/work/shared/testdata/apptainer/e2e")


@pytest.mark.skipif(not (E2E / "custom.def").exists(), reason=f"no {E2E}/custom.def")
def test_apptainer_e2e_image(user, userdir):
    """Apptainer's e2e test image (restated on busybox: custom.def), built here and
    run as Apptainer's e2e tests run it."""
    d = userdir / "custom.def"
    shutil.copy(E2E / "custom.def", d)
    os.chown(d, user.uid, user.gid)
    d.chmod(0o644)
    out = userdir / "e2e.sif"
    build(user, userdir, out, d)
    r = hrun(user, "run", str(out), "echo", "hi")
    assert r.stdout == "Running command: echo hi\nhi\n", r.stderr
    r = hrun(user, "exec", str(out), "sh", "-c", 'echo "$AVENGERS $GOPATH"')
    assert r.stdout == "assemble /go\n", r.stderr
    r = hrun(user, "run", "--app", "testapp", str(out))
    assert r.stdout == "testapp\n", r.stderr
    r = hrun(user, "run", "--app", "foo", str(out))
    assert r.stdout == "RUNNING FOO\n", r.stderr
    r = hrun(user, "exec", str(out), "sh", "-c",
             "cat /scif/apps/foo/scif/runscript.help /scif/apps/bar/scif/labels.json; "
             "readlink /var/etc; readlink /etc/absolute-slink")
    assert "This is the help for foo!" in r.stdout and '"HELLOTHISIS": "bar"' in r.stdout
    assert "/etc\n/usr/share/zoneinfo/Etc/UTC" in r.stdout, r.stdout
    r = hrun(user, "exec", str(out), "env", "-i", "APPTAINER_APPNAME=foo", "/bin/sh",
             "/.singularity.d/actions/run")
    assert r.stdout == "RUNNING FOO\n", r.stderr


def test_unused_build_arg_and_headerless_file(user, userdir):
    d = write(userdir / "t.def", "Bootstrap: busybox  # comment\n%post\n    true\n", user)
    r = build(user, userdir, userdir / "o.sqfs", d, "--build-arg", "NOPE=1", ok=False)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines()[-1] == (
        f"hpcimage: error: --build-arg NOPE: not used by {d} "
        "(--warn-unused-build-args makes this a warning)")
    assert not (userdir / "o.sqfs").exists()
    r = build(user, userdir, userdir / "o.sqfs", d, "--build-arg", "NOPE=1",
              "--warn-unused-build-args")
    assert f"hpcimage: warning: --build-arg NOPE: not used by {d}" in r.stderr
    d = write(userdir / "h.def", "%post\n    true\n", user)
    r = build(user, userdir, userdir / "h.sqfs", d, ok=False)
    assert r.returncode == 2 and f"{d}:1: no 'Bootstrap: AGENT' header" in r.stderr
