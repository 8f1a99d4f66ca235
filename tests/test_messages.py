"""Messages a user meets (issue 12, section 6): every error one line with its status,
hints where a habit from Apptainer or the shell misleads, a foreign architecture
refused up front, `-h` everywhere."""
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from conftest import PY, cli_argv, readable, runtime_argv

from hpcimage.image import arch as archmod
from hpcimage.image import sif


def one_line(r, prefix, status):
    assert r.returncode == status, (r.returncode, r.stdout, r.stderr)
    assert r.stderr.startswith(prefix), r.stderr
    assert r.stderr.count("\n") == 1 and r.stderr.endswith("\n"), r.stderr
    return r.stderr


# ------------------------------------------------------------------ click's errors

@pytest.mark.parametrize("argv,line", [
    (["build", "--x"], "hpcimage: error: no such option: --x (see 'hpcimage build --help')"),
    (["build", "--forc"], "hpcimage: error: no such option: --forc; did you mean '--force'? "
                          "(see 'hpcimage build --help')"),
    (["nosuch"], "hpcimage: error: no such command: nosuch (see 'hpcimage --help')"),
    (["sif", "header"], "hpcimage: error: missing argument 'IMAGE' "
                        "(see 'hpcimage sif header --help')"),
    (["publish", "x"], "hpcimage: error: missing option '--name' "
                       "(see 'hpcimage publish --help')"),
    (["mpi", "doctor", "--y"], "hpcimage: error: no such option: --y "
                               "(see 'hpcimage mpi doctor --help')"),
    (["image-update", "--x"], "image-update: error: no such option: --x "
                              "(see 'image-update --help')"),
    (["image-update", "--check", "--remove"],
     "image-update: error: --check and --remove exclude each other "
     "(see 'image-update --help')"),
])
def test_usage_errors_are_one_line(user, argv, line):
    r = user.run(cli_argv(*argv), env={"HPCIMAGE_IMAGE": "/nonexistent.sqfs"})
    assert (r.returncode, r.stdout, r.stderr) == (2, "", line + "\n")


@pytest.mark.parametrize("argv,line", [
    (["image-exec", "--bogus", "true"],
     "image-exec: error: no such option: --bogus (see 'image-exec --help')"),
    (["image-exec", "--bogus=1", "true"],
     "image-exec: error: no such option: --bogus (see 'image-exec --help')"),
    (["exec", "-q", "x.sif", "true"],
     "hpcimage: error: no such option: -q (see 'hpcimage exec --help')"),
])
def test_runtime_unknown_option_says_it_as_click_does(user, argv, line):
    """The runtime parses its options by hand, and says an unknown one in click's form."""
    r = user.run(runtime_argv(*argv), env={"HPCIMAGE_IMAGE": "/nonexistent.sqfs"})
    assert (r.returncode, r.stdout, r.stderr) == (2, "", line + "\n")
    if argv[0] == "exec":
        r = user.run(cli_argv(*argv), env={"HPCIMAGE_IMAGE": "/nonexistent.sqfs"})
        assert (r.returncode, r.stdout, r.stderr) == (2, "", line + "\n")


@pytest.mark.parametrize("flag", ["-h", "--help"])
def test_image_update_h_is_help(user, flag):
    r = user.run(["sh", str(readable("wrappers/image-update")), flag],
                 env={"HPCIMAGE_IMAGE": "/nonexistent.sqfs", "HPCIMAGE_PYTHON": PY})
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("Usage: image-update [OPTIONS]")
    assert "-h, --help" in r.stdout and "--check" in r.stdout


# ------------------------------------------------------- the wrappers' interpreter

@pytest.fixture
def not_executable(userdir):
    p = userdir / "python3"
    p.write_text("#!/bin/sh\n")
    p.chmod(0o644)
    return p


@pytest.mark.parametrize("verb", ["image-exec", "image-mpi", "image-update"])
def test_wrong_hpcimage_python_is_one_line(user, verb, userdir, not_executable):
    wrapper = str(readable(f"wrappers/{verb}"))
    base = {"HPCIMAGE_IMAGE": "/nonexistent.sqfs"}
    cases = [
        ("/no/such/python3", 127, "HPCIMAGE_PYTHON=/no/such/python3: no such file"),
        ("no-such-python3", 127, "HPCIMAGE_PYTHON=no-such-python3: no such file"),
        (str(not_executable), 126, f"HPCIMAGE_PYTHON={not_executable}: not executable"),
        (str(userdir), 126, f"HPCIMAGE_PYTHON={userdir}: not executable"),
        # a Python without hpcimage (Debian's, isolated from any site-packages of ours)
        ("/usr/bin/python3", 1, "HPCIMAGE_PYTHON=/usr/bin/python3: hpcimage is not "
                                "installed for it (No module named 'hpcimage')"),
    ]
    for py, status, what in cases:
        r = user.run(["sh", wrapper, "true"], env=dict(base, HPCIMAGE_PYTHON=py))
        assert (r.returncode, r.stdout, r.stderr) == (status, "", f"{verb}: error: {what}\n")


def test_wrong_site_python_is_one_line(user, userdir):
    w = userdir / "image-exec"
    text = readable("wrappers/image-exec").read_text()
    w.write_text(text.replace("hpcimage_python='/opt/hpcimage/venv/bin/python3'",
                              "hpcimage_python='/opt/none/python3'"))
    w.chmod(0o755)
    r = user.run([str(w), "true"], env={"HPCIMAGE_IMAGE": "/x.sqfs"})
    assert (r.returncode, r.stderr) == (127, "image-exec: error: python /opt/none/python3 "
                                             "(site.yaml; HPCIMAGE_PYTHON names another): "
                                             "no such file\n")


# ----------------------------------------------------- commands the image cannot run

def exec_(user, image, *cmd, cwd, opts=()):
    return user.run(runtime_argv("image-exec", *opts, *cmd),
                    env={"HPCIMAGE_IMAGE": image}, cwd=str(cwd))


@pytest.fixture
def scripts(user, userdir):
    def put(name, text, mode):
        p = userdir / name
        p.write_text(text)
        p.chmod(mode)
        os.chown(p, user.uid, user.gid)
    put("noexec", "echo hi\n", 0o644)
    put("nointerp", "#!/no/such/interp\n", 0o755)
    put("badinterp", "#!/etc/passwd -x\n", 0o755)
    put("script.sh", "#!/bin/sh\necho hi\n", 0o755)
    bindir = userdir / "bin"
    bindir.mkdir()
    (bindir / "plain").write_text("echo hi\n")
    (bindir / "plain").chmod(0o644)
    return userdir


# demo: /.singularity.d/env scripts, so the command is exec'd by /bin/sh;
# bare: none, so the launcher execs it directly. Both say the same thing.
@pytest.fixture(params=["demo", "bare"])
def either(request, demo_dir, bare_dir):
    return str(demo_dir if request.param == "demo" else bare_dir)


@pytest.mark.parametrize("cmd,status,msg", [
    (["./noexec"], 126, "./noexec: not executable (permission denied)"),
    (["./nointerp"], 127, "./nointerp: bad interpreter /no/such/interp: no such file in the image"),
    (["./badinterp"], 126, "./badinterp: bad interpreter /etc/passwd: not executable "
                           "(permission denied)"),
    (["cd", "/"], 127, "cd: command not found in the image (PATH="),
    (["script.sh"], 127, "script.sh: command not found in the image (PATH="),
    (["plain"], 127, "plain: command not found in the image (PATH="),
])
def test_cannot_run_is_one_line_on_both_paths(user, either, scripts, cmd, status, msg):
    opts = ("--env", f"PATH={scripts}/bin:/bin") if cmd == ["plain"] else ()
    err = one_line(exec_(user, either, *cmd, cwd=scripts, opts=opts),
                   f"image-exec: error: {msg}", status)
    if cmd == ["script.sh"]:
        assert err.endswith("; did you mean ./script.sh?\n"), err
    else:
        assert "did you mean" not in err


def test_image_named_first_gets_a_hint(user, either, demo_sif, userdir):
    hint = ("; image-exec runs the loaded module's image: drop the image argument, "
            "or use 'hpcimage exec IMAGE CMD'\n")
    err = one_line(exec_(user, either, "ubuntu.sif", "cat", "/etc/os-release", cwd=userdir),
                   "image-exec: error: ubuntu.sif: command not found in the image (PATH=", 127)
    assert err.endswith(hint), err
    shutil.copy(demo_sif, userdir / "demo.sif")
    os.chmod(userdir / "demo.sif", 0o755)           # a SIF is executable (its #! line)
    err = one_line(exec_(user, either, "./demo.sif", "true", cwd=userdir),
                   "image-exec: error: ./demo.sif: is an image, not a program", 126)
    assert err.endswith(hint), err
    err = one_line(exec_(user, either, "demo.sif", "true", cwd=userdir),
                   "image-exec: error: demo.sif: command not found in the image", 127)
    assert err.endswith(hint), err


def test_hpcimage_exec_without_image_says_the_image_comes_first(user, userdir):
    r = user.run(cli_argv("exec", "cat", "/etc/os-release"), cwd=str(userdir))
    assert (r.returncode, r.stderr) == (2, "hpcimage: error: cat: image not found (the image "
                                           "comes first: hpcimage exec [OPTIONS] IMAGE "
                                           "COMMAND [ARGS...])\n")
    r = user.run(runtime_argv("image-exec", "true"),
                 env={"HPCIMAGE_IMAGE": "/no/such/Gone-1.0.sqfs", "HPCIMAGE_MODULE": "Gone/1.0"})
    assert (r.returncode, r.stderr) == (2, "image-exec: error: /no/such/Gone-1.0.sqfs: image "
                                           "not found (the image of module Gone/1.0 is "
                                           "missing on this node)\n")


@pytest.fixture
def noexec_dir(user, userdir):
    """A directory on a noexec mount holding an executable program (as /tmp or $HOME
    often are on clusters)."""
    d = userdir / "noexec"
    d.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "noexec,mode=0755", "hpcimage-test", str(d)],
                   check=True)
    try:
        shutil.copy("/bin/busybox", d / "prog")
        os.chmod(d / "prog", 0o755)
        yield d
    finally:
        subprocess.run(["umount", "-l", str(d)], check=False)


def test_noexec_mount_is_one_line(user, either, noexec_dir):
    # busybox's `[ -x ]` does not see noexec: the launcher checks with access(2)
    one_line(exec_(user, either, "./prog", "true", cwd=noexec_dir),
             "image-exec: error: ./prog: not executable (permission denied)", 126)


# ------------------------------------------------------------- foreign architecture

def foreign():
    return "amd64" if archmod.host() == "arm64" else "arm64"


def test_sif_for_another_architecture_is_refused(user, demo_sqfs, userdir):
    other = foreign()
    img = userdir / f"{other}.sif"
    sif.write_sif(img, demo_sqfs, arch=other)
    os.chmod(img, 0o644)
    for argv in (cli_argv("exec", str(img), "true"), runtime_argv("image-exec", "true")):
        r = user.run(argv, env={"HPCIMAGE_IMAGE": str(img)}, cwd=str(userdir))
        assert (r.returncode, r.stderr.split("error: ", 1)[1]) == \
            (2, f"{img}: image built for {other}, this node is {archmod.host()}\n"), r.stderr
    # what the image is can still be read
    r = user.run(cli_argv("inspect", "--json", str(img)))
    assert r.returncode == 0, r.stderr


@pytest.fixture
def foreign_tree(user, userdir):
    """A tree whose /bin/sh (a link to busybox) has an ELF header saying another machine."""
    root = userdir / "foreign"
    (root / "bin").mkdir(parents=True)
    data = bytearray(Path("/bin/busybox").read_bytes())
    data[18:20] = (183 if foreign() == "arm64" else 62).to_bytes(2, "little")
    (root / "bin" / "busybox").write_bytes(bytes(data))
    (root / "bin" / "busybox").chmod(0o755)
    (root / "bin" / "sh").symlink_to("busybox")
    (root / "bin" / "true").symlink_to("busybox")
    subprocess.run(["chown", "-R", f"{user.uid}:{user.gid}", str(root)], check=True)
    return root


@pytest.mark.parametrize("kind", ["dir", "sqfs"])
def test_tree_for_another_architecture_is_refused(user, foreign_tree, userdir, kind):
    img = foreign_tree
    if kind == "sqfs":
        img = userdir / "foreign.sqfs"
        subprocess.run(["mksquashfs", str(foreign_tree), str(img), "-quiet", "-no-progress"],
                       check=True, stdout=subprocess.DEVNULL)
        os.chmod(img, 0o644)
    r = user.run(runtime_argv("image-exec", "true"), env={"HPCIMAGE_IMAGE": str(img)},
                 cwd=str(userdir))
    assert (r.returncode, r.stderr) == (
        2, f"image-exec: error: {img}: image built for {foreign()}, this node is "
           f"{archmod.host()}\n")


def test_elf_arch_and_compatibility(tmp_path):
    assert archmod.elf_arch("/") == archmod.host()
    (tmp_path / "bin").mkdir()
    assert archmod.elf_arch(str(tmp_path)) is None               # no /bin/sh
    (tmp_path / "bin" / "sh").symlink_to("/bin/../usr/bin/dash")  # resolved inside the root
    (tmp_path / "usr" / "bin").mkdir(parents=True)
    (tmp_path / "usr" / "bin" / "dash").write_bytes(
        b"\x7fELF\x02\x01\x01" + bytes(11) + (183).to_bytes(2, "little"))
    assert archmod.elf_arch(str(tmp_path)) == "arm64"
    assert archmod.runs_here("386", "amd64") and archmod.runs_here("unknown", "amd64")
    assert not archmod.runs_here("s390x", "amd64")


# ------------------------------------------------------------- a long build says what it does

DEBOOTSTRAP_DEF = """\
Bootstrap: debootstrap
OSVersion: bookworm
MirrorURL: http://127.0.0.1:9/debian
"""


@pytest.mark.skipif(shutil.which("debootstrap", path="/usr/sbin:/usr/bin:/sbin:/bin") is None,
                    reason="debootstrap not installed")
def test_debootstrap_build_says_what_it_does_and_v_shows_its_output(user, userdir):
    """A mirror that refuses the connection: the build fails in a second, having said
    what it was doing; -v shows debootstrap's own lines as they come."""
    d = userdir / "deb.def"
    d.write_text(DEBOOTSTRAP_DEF)
    os.chown(d, user.uid, user.gid)
    r = user.run(cli_argv("build", str(userdir / "o.sif"), str(d)), cwd=str(userdir))
    assert r.returncode == 1, r.stderr
    lines = r.stderr.splitlines()
    assert ("hpcimage: build: debootstrap bookworm from http://127.0.0.1:9/debian "
            "(takes a few minutes; -v shows its output)") in lines, r.stderr
    assert lines[-1].startswith("hpcimage: error: ") and "debootstrap bookworm failed" in \
        lines[-1], r.stderr
    assert not any(ln.startswith(("I: ", "E: ")) for ln in lines), r.stderr
    assert not (userdir / "o.sif").exists()
    r = user.run(cli_argv("build", "-v", str(userdir / "o.sif"), str(d)), cwd=str(userdir))
    assert r.returncode == 1, r.stderr
    lines = r.stderr.splitlines()
    assert ("hpcimage: build: debootstrap bookworm from http://127.0.0.1:9/debian "
            "(takes a few minutes)") in lines, r.stderr
    assert any(ln.startswith(("I: ", "E: ")) for ln in lines), r.stderr
    assert lines[-1].endswith("its output is above"), r.stderr


# ------------------------------------------------------------------ one printer

def test_runtime_messages_carry_no_program_name():
    """The one printer (runtime.main.main, cli.commands.main) says who speaks: no
    message raised in the runtime, the host discovery or the image code starts with a
    program's name (issue 13)."""
    import ast
    root = Path(__file__).resolve().parent.parent / "hpcimage"
    bad = []
    for top in ("runtime", "host", "image", "config", "linux"):
        for path in sorted((root / top).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text())):
                if not (isinstance(node, ast.Raise) and isinstance(node.exc, ast.Call)
                        and node.exc.args):
                    continue
                first = node.exc.args[0]
                if isinstance(first, ast.JoinedStr):
                    first = first.values[0] if first.values else None
                    if isinstance(first, ast.FormattedValue):
                        src = ast.unparse(first.value)
                        if src == "prog" or src.endswith(".prog"):
                            bad.append(f"{path.relative_to(root)}:{node.lineno}")
                        continue
                if isinstance(first, ast.Constant) and isinstance(first.value, str) and (
                        first.value.startswith(("image-", "hpcimage "))):
                    bad.append(f"{path.relative_to(root)}:{node.lineno}")
    assert bad == [], bad
