"""The runtime as a user meets it: image-exec/run/shell on directory and SquashFS images,
started as the non-root test user (and once as root)."""
import os
import shlex
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from conftest import PY, runtime_argv, cli_argv, fuse_processes, wait_no_leaks


def exec_(user, image, *cmd, env=None, cwd=None, opts=(), input=None, root=False):
    e = {"HPCIMAGE_IMAGE": image}
    e.update(env or {})
    return user.run(runtime_argv("image-exec", *opts, *cmd), env=e, cwd=cwd, input=input,
                    root=root)


# ----------------------------------------------------------------- argv, status

def test_argv_verbatim(user, image):
    args = ["a b", "", "*", "'single'", '"double"', "$(touch /tmp/x)", "back\\slash", "\n", "-e"]
    r = exec_(user, image, "printf", "[%s]\\n", *args)
    assert r.returncode == 0, r.stderr
    assert r.stdout == "".join(f"[{a}]\n" for a in args)


def test_exit_status_is_the_commands(user, image):
    assert exec_(user, image, "sh", "-c", "exit 42").returncode == 42
    assert exec_(user, image, "true").returncode == 0
    assert exec_(user, image, "false").returncode == 1


def test_command_not_found_127(user, image):
    r = exec_(user, image, "no-such-tool", "x")
    assert r.returncode == 127
    assert "no-such-tool: command not found in the image" in r.stderr
    r = exec_(user, image, "/opt/none/tool")
    assert r.returncode == 127
    assert "/opt/none/tool: no such file in the image" in r.stderr


def test_not_executable_126(user, image):
    r = exec_(user, image, "/etc/os-release")
    assert r.returncode == 126
    assert "/etc/os-release: not executable" in r.stderr
    r = exec_(user, image, "/etc")
    assert r.returncode == 126


def test_signal_death_reported_as_128_plus_n(user, image):
    r = user.run(["sh", "-c", f'"$0" -I -m hpcimage.runtime image-exec sh -c "kill -KILL \\$\\$"; echo status=$?', PY],
                 env={"HPCIMAGE_IMAGE": image})
    assert "status=137" in r.stdout, r.stderr
    r = exec_(user, image, "sh", "-c", "kill -TERM $$")
    assert r.returncode == -signal.SIGTERM


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signals_reach_the_command(user, image, sig):
    p = user.popen(runtime_argv("image-exec", "sh", "-c",
                                'trap "echo got-signal; exit 7" TERM INT; echo ready; '
                                'while :; do sleep 0.05; done'),
                   env={"HPCIMAGE_IMAGE": image}, stdout=subprocess.PIPE,
                   stderr=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "ready"
    os.kill(p.pid, sig)
    out, err = p.communicate(timeout=20)
    assert "got-signal" in out
    assert p.returncode == 7


# ------------------------------------------------------------------- identity

def test_user_keeps_uid_gid_and_owns_files_written(user, image, userdir):
    r = exec_(user, image, "sh", "-c",
              f'id -u; id -g; echo data > {userdir}/out.txt; grep "^{user.name}:" /etc/passwd',
              cwd=str(userdir))
    assert r.returncode == 0, r.stderr
    uid, gid, pw = r.stdout.splitlines()
    assert (int(uid), int(gid)) == (user.uid, user.gid)
    assert pw.startswith(f"{user.name}:x:{user.uid}:{user.gid}:")
    st = os.stat(userdir / "out.txt")
    assert (st.st_uid, st.st_gid) == (user.uid, user.gid)


def test_root_case(user, image, tmp_path):
    r = exec_(user, image, "sh", "-c", "id -u; cat /etc/os-release", root=True, cwd=str(tmp_path))
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines()[0] == "0"
    assert "hpcimage Demo" in r.stdout


# -------------------------------------------------------------------- binds

def test_default_binds(user, image, userdir):
    (userdir / "here.txt").write_text("cwd-file\n")
    home_marker = os.path.join(user.home, ".hpcimage-test-marker")
    with open(home_marker, "w") as f:
        f.write("home-file\n")
    os.chown(home_marker, user.uid, user.gid)
    try:
        r = exec_(user, image, "sh", "-c",
                  'pwd; cat here.txt; cat "$HOME/.hpcimage-test-marker"; '
                  'echo x > /dev/null && echo devnull-ok; ls /proc/self/ >/dev/null && echo proc-ok; '
                  'ls /sys/kernel >/dev/null && echo sys-ok; cat /etc/hosts | head -1',
                  cwd=str(userdir))
    finally:
        os.unlink(home_marker)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[:6] == [str(userdir), "cwd-file", "home-file", "devnull-ok", "proc-ok", "sys-ok"]
    with open("/etc/hosts") as f:
        assert lines[6] == f.readline().rstrip("\n")


def test_tmp_is_the_hosts(user, image, userdir):
    name = f"/tmp/hpcimage-test-{os.getpid()}-{time.monotonic_ns()}"
    try:
        r = exec_(user, image, "sh", "-c", f"echo shared > {name}")
        assert r.returncode == 0, r.stderr
        with open(name) as f:
            assert f.read() == "shared\n"
    finally:
        if os.path.exists(name):
            os.unlink(name)


def test_bare_image_runs_with_missing_bind_targets(user, bare, userdir):
    """An image holding only /bin/busybox and its links: /etc, /home, /tmp, /proc,
    /dev ... all missing, and every default bind still works."""
    r = exec_(user, bare, "sh", "-c", 'pwd; id -un; ls -d /proc/1 /dev/null "$HOME" /tmp; ls /',
              cwd=str(userdir))
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0] == str(userdir)
    assert lines[1] == user.name
    assert "bin" in lines and "etc" in lines and "home" in lines


def test_user_bind_ro_rw_and_dst(user, image, userdir):
    src = userdir / "data"
    src.mkdir()
    os.chown(src, user.uid, user.gid)
    (src / "f").write_text("bound\n")
    r = exec_(user, image, "sh", "-c", "cat /data/f; echo w > /data/new && echo wrote",
              opts=("-B", f"{src}:/data:ro"))
    assert r.stdout.startswith("bound\n")
    assert "wrote" not in r.stdout
    assert "Read-only file system" in r.stderr
    assert not (src / "new").exists()
    r = exec_(user, image, "sh", "-c", "echo w > /mnt/deep/new && echo wrote",
              opts=(f"--bind={src}:/mnt/deep",))
    assert r.stdout == "wrote\n", r.stderr
    assert (src / "new").read_text() == "w\n"


def test_bind_missing_source_is_bad_input(user, image):
    r = exec_(user, image, "true", opts=("-B", "/no/such/dir:/x"))
    assert r.returncode == 2
    assert r.stderr.strip() == "image-exec: error: bind source /no/such/dir does not exist"


@pytest.mark.parametrize("spec,msg", [
    ("/tmp:rel/path", "destination must be an absolute path"),
    ("/tmp:/x:rx", "unknown option 'rx'"),
    ("/tmp:/x:ro:extra", "too many ':'"),
])
def test_bad_bind_spec(user, demo_dir, spec, msg):
    r = exec_(user, str(demo_dir), "true", opts=("-B", spec))
    assert r.returncode == 2
    assert msg in r.stderr and r.stderr.count("\n") == 1


def test_pwd_and_contain(user, image, userdir):
    r = exec_(user, image, "pwd", opts=("--pwd", "/etc"), cwd=str(userdir))
    assert r.stdout == "/etc\n"
    r = exec_(user, image, "true", opts=("--pwd", "/no/such"))
    assert r.returncode == 2 and "--pwd /no/such: no such directory" in r.stderr
    marker = f"/tmp/hpcimage-contain-{os.getpid()}"
    open(marker, "w").close()
    try:
        r = exec_(user, image, "sh", "-c",
                  f'pwd; ls -A "$HOME" | wc -l; test -e {marker} && echo host-tmp; '
                  f'test -e {userdir} && echo host-cwd; echo x > /tmp/t && echo tmp-writable; '
                  'ls /dev | wc -l',
                  opts=("-C",), cwd=str(userdir))
    finally:
        os.unlink(marker)
    lines = r.stdout.split()
    assert r.returncode == 0, r.stderr
    assert lines[0] == user.home and lines[1] == "0"
    assert "host-tmp" not in lines and "host-cwd" not in lines
    assert "tmp-writable" in lines
    assert int(lines[-1]) < 15  # a minimal /dev


# -------------------------------------------------------------- environment

def test_env_scripts_sourced_in_order_and_forced_vars_win(user, image):
    r = exec_(user, image, "sh", "-c",
              'echo "$ORDER|$FROM_ENV|$DEMO_IMAGE|$A|$B|$C|$D|$PATH"',
              env={"APPTAINERENV_A": "apptainer", "SINGULARITYENV_B": "singularity",
                   "HPCIMAGE_ENV_FROM_ENV": "forced", "SINGULARITYENV_C": "low",
                   "APPTAINERENV_C": "high", "APPTAINERENV_PREPEND_PATH": "/pre"},
              opts=("--env", "D=cli value"))
    assert r.returncode == 0, r.stderr
    order, from_env, demo, a, b, c, d, path = r.stdout.rstrip("\n").split("|")
    assert order == "first second"       # 10-first.sh, then 50-second.sh
    assert demo == "1"                   # 90-environment.sh
    assert from_env == "forced"          # HPCIMAGE_ENV_ beats the image's scripts
    assert (a, b, c, d) == ("apptainer", "singularity", "high", "cli value")
    assert path.startswith("/pre:/opt/demo/bin:")


def test_host_env_passes_but_not_path(user, image):
    r = exec_(user, image, "sh", "-c", 'echo "$MYVAR|$PATH|$APPTAINER_CONTAINER"',
              env={"MYVAR": "host value", "PATH": "/host/only:/usr/bin:/bin"})
    myvar, path, container = r.stdout.rstrip("\n").split("|")
    assert myvar == "host value"
    assert "/host/only" not in path
    assert container == image


def test_cleanenv_keeps_documented_minimum(user, image):
    r = exec_(user, image, "env", opts=("-e",),
              env={"MYVAR": "x", "LC_ALL": "C", "APPTAINERENV_KEEP": "forced"})
    names = {ln.split("=", 1)[0] for ln in r.stdout.splitlines()}
    assert "MYVAR" not in names
    assert {"HOME", "USER", "LC_ALL", "PATH", "KEEP", "APPTAINER_CONTAINER"} <= names


def test_env_no_shell_image_gets_forced_vars_directly(user, bare):
    r = exec_(user, bare, "env", env={"APPTAINERENV_XYZ": "1"}, opts=("--env", "Q=2"))
    assert "XYZ=1" in r.stdout.splitlines() and "Q=2" in r.stdout.splitlines()


def test_bad_env_option(user, image):
    r = exec_(user, image, "true", opts=("--env", "1BAD=x"))
    assert r.returncode == 2 and "--env wants NAME=VALUE" in r.stderr


# ------------------------------------------------------------ run and shell

def test_image_run_runscript_with_args(user, image):
    r = user.run(runtime_argv("image-run", "echo", "arg with space"),
                 env={"HPCIMAGE_IMAGE": image})
    assert r.returncode == 0, r.stderr
    assert r.stdout == "Hello from hpcimage Demo 1.0 (busybox)\narg with space\n"


def test_image_run_without_runscript(user, bare):
    r = user.run(runtime_argv("image-run"), env={"HPCIMAGE_IMAGE": bare})
    assert r.returncode == 1
    assert "this image has no runscript (/.singularity.d/runscript)" in r.stderr


def test_image_shell(user, image):
    r = user.run(runtime_argv("image-shell", "-c", 'echo hi "$DEMO_IMAGE"'),
                 env={"HPCIMAGE_IMAGE": image})
    assert r.stdout == "hi 1\n"
    r = user.run(runtime_argv("image-shell"), env={"HPCIMAGE_IMAGE": image},
                 input='cat /etc/os-release | head -1\nexit 5\n')
    assert r.returncode == 5
    assert r.stdout.startswith('NAME="hpcimage Demo"')


def test_wrappers_need_a_module(user):
    for verb in ("image-exec", "image-run", "image-shell", "image-mpi"):
        r = user.run(runtime_argv(verb, "true"))
        assert r.returncode == 2
        assert r.stderr.startswith(f"{verb}: error: no image module loaded: run 'module load")


def test_hpcimage_cli_exec_run_shell(user, image, userdir):
    r = user.run(cli_argv("exec", "-B", f"{userdir}:/data", "--pwd", "/data", image, "pwd"))
    assert r.stdout == "/data\n", r.stderr
    r = user.run(cli_argv("run", image))
    assert r.stdout.startswith("Hello from")
    r = user.run(cli_argv("shell", image, "-c", "exit 3"))
    assert r.returncode == 3
    r = user.run(cli_argv("exec", image, "no-such"))
    assert r.returncode == 127
    assert r.stderr.startswith("hpcimage: error: no-such: command not found")


@pytest.mark.parametrize("what,msg", [
    ("/no/such/image.sqfs", "/no/such/image.sqfs: image not found"),
    ("/etc/hostname", "/etc/hostname: not an image"),
])
def test_bad_images(user, what, msg):
    r = user.run(cli_argv("exec", what, "true"))
    assert r.returncode == 2
    assert r.stderr == f"hpcimage: error: {msg}" + r.stderr[len(f"hpcimage: error: {msg}"):]
    assert r.stderr.count("\n") == 1


def test_corrupt_squashfs_fails_cleanly(user, userdir):
    bad = userdir / "bad.sqfs"
    bad.write_bytes(b"hsqs" + b"\0" * 4092)
    os.chmod(bad, 0o644)
    r = user.run(cli_argv("exec", str(bad), "true"))
    assert r.returncode == 1
    assert r.stderr.startswith(f"hpcimage: error: {bad}: cannot mount image with squashfuse")
    assert r.stderr.count("\n") == 1


def test_dry_run_prints_plan_and_does_nothing(user, image, userdir):
    r = exec_(user, image, "touch", f"{userdir}/made", opts=("--dry-run",), cwd=str(userdir))
    assert r.returncode == 0
    assert not (userdir / "made").exists()
    ops = [ln.split()[0] for ln in r.stdout.splitlines() if not ln.startswith((" ", "#"))]
    assert ops[:4] == ["userns", "private", "session", "image"]
    assert ops[-4:] == ["readonly", "pivot", "chdir", "exec"]
    assert f"chdir {userdir}  # else {user.home}, else /" in r.stdout
    assert f"bind {userdir} ->" not in r.stdout       # under /tmp, bound already
    r = exec_(user, image, "true", opts=("--dry-run",), cwd="/opt/hpcimage")
    assert "bind /opt/hpcimage -> /opt/hpcimage  # current directory" in r.stdout


def _words(line):
    """The words of a --dry-run line (its `  # note` left out), and that part."""
    head = line.split("  # ", 1)[0]
    return shlex.split(head), head


def test_quote_is_shlex_quote():
    import random
    from hpcimage.runtime.ops import quote
    rnd = random.Random(5)
    for _ in range(20000):
        t = "".join(rnd.choice("aZ9 '\"$\\\n\t-=%@,:./_+*?[]~#!&;|()<>{}é") for _ in range(rnd.randrange(8)))
        assert quote(t) == shlex.quote(t), repr(t)


def test_dry_run_speaks_shell_words(user, image, userdir):
    """--dry-run prints words a shell user reads: every path and argument quoted as sh
    needs it, no Python list, True/False/None (issue 12)."""
    here = userdir / "my dir"
    data = userdir / "data set"
    for d in (here, data):
        d.mkdir()
        os.chown(d, user.uid, user.gid)
    cmd = ["sh", "-c", 'echo "it\'s $HOME" > out', "arg with spaces", ""]
    r = exec_(user, image, *cmd, cwd=str(here),
              opts=("--dry-run", "-B", f"{data}:/in put:ro", "--env", "Q=a 'b' \"c\""))
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    for line in lines:
        assert not any(x in line for x in ("['", "']", "', '", "True", "False", "None")), line
        if line.startswith("#"):
            continue
        words, head = _words(line)          # sh syntax: shlex.split takes it
        assert words, line
    found = {tuple(_words(ln)[0]) for ln in lines}
    assert ("bind", str(data), "->", "/in put", "ro") in found, r.stdout
    assert ("chdir", str(here)) in found
    assert ("exec", *cmd) in found
    assert ("env", "Q=a 'b' \"c\"") in found
    rootfs = next(ln for ln in lines if ln.startswith("rootfs "))
    assert "'/in put'" in rootfs.split("  # ", 1)[1]
    # image-mpi --dry-run prints the launcher's command line, quoted the same way
    r = user.run(runtime_argv("image-mpi", "--dry-run", "--launcher", "mpirun", "-n", "2",
                              "--bind", str(data), *cmd),
                 env={"HPCIMAGE_IMAGE": image}, cwd=str(here))
    if r.returncode == 0:
        words = shlex.split(r.stdout)
        assert " ".join(shlex.quote(w) for w in words) == r.stdout.strip()
        assert words[-len(cmd) - 1:] == ["--", *cmd] and str(data) in words
    else:
        assert "launcher 'mpirun' not found" in r.stderr


# ------------------------------------------------------------------- leaks

def test_no_leak_after_sigkill_of_running_container(user, demo_sqfs):
    p = user.popen(runtime_argv("image-exec", "sh", "-c", "echo ready; sleep 60"),
                   env={"HPCIMAGE_IMAGE": str(demo_sqfs)}, stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "ready"
    assert fuse_processes(user.uid), "squashfuse should serve the running container"
    os.kill(p.pid, signal.SIGKILL)
    p.wait(timeout=10)
    procs, mounts = wait_no_leaks(user.uid)
    assert procs == [] and mounts == []


@pytest.mark.parametrize("kind", ["dir", "sqfs"])
def test_hot_path_imports_only_stdlib_and_runtime(user, demo_dir, userdir, kind):
    """image-exec, started for real: only the standard library and the runtime modules,
    and not even the heavier standard ones (enum comes with `signal`; `_signal` is used)."""
    image = str(demo_dir) + (".sqfs" if kind == "sqfs" else "")
    r = user.run([PY, "-X", "importtime", "-I", "-m", "hpcimage.runtime", "image-exec",
                  "true"], env={"HPCIMAGE_IMAGE": image}, cwd=str(userdir))
    assert r.returncode == 0, r.stderr
    mods = [ln.split("|")[-1].strip() for ln in r.stderr.splitlines() if "|" in ln]
    ours = {m for m in mods if m.startswith("hpcimage")}
    # the runtime's rooms and those below it (DESIGN.md), of config only the site.json
    # reader (site.yaml's parser needs yaml; the bind-spec grammar comes with a bind)
    assert ours and all(m.split(".")[1] in ("runtime", "image", "host", "errors", "linux")
                        or m in ("hpcimage.config", "hpcimage.config.policy")
                        for m in ours if "." in m), ours
    assert ("hpcimage.image.squashfs" in ours) == (kind == "sqfs")
    for banned in ("click", "jinja2", "yaml", "psutil", "pkg_resources", "subprocess",
                   "signal", "enum", "socket", "json", "re"):
        assert not any(m == banned or m.startswith(banned + ".") for m in mods), banned


def test_session_dir_over_user_data_keeps_binds_and_image(user, demo_dir, userdir):
    """Where /var/lib/hpcimage/mnt is missing a fallback directory (/mnt, ...) holds the
    session tmpfs; data below it (-B sources, the image) must stay reachable."""
    sub = userdir / "sub"
    sub.mkdir()
    (sub / "f").write_text("bound\n")
    img = userdir / "img.sqfs"
    import shutil
    shutil.copy(str(demo_dir) + ".sqfs", img)
    os.chmod(img, 0o644)
    r = user.run(runtime_argv("image-exec", "-B", f"{sub}:/data", "sh", "-c",
                              "cat /data/f; head -1 /etc/os-release"),
                 env={"HPCIMAGE_IMAGE": str(img), "HPCIMAGE_SESSION_DIR": str(userdir)})
    assert r.returncode == 0, r.stderr
    assert r.stdout == 'bound\nNAME="hpcimage Demo"\n'


# ------------------------------------------------------- the working directory

@pytest.fixture
def usr_project(user):
    """A project directory of the test user below a system directory, which the
    image lacks (/usr/local/src/NAME)."""
    d = Path(tempfile.mkdtemp(prefix="hpcimage-proj-", dir="/usr/local/src"))
    os.chown(d, user.uid, user.gid)
    d.chmod(0o755)
    (d / "here.txt").write_text("project-file\n")
    yield d
    shutil.rmtree(d, ignore_errors=True)


def test_cwd_below_a_system_directory_is_bound(user, image, usr_project):
    """`cd /usr/local/src/proj; image-exec make clean` works in that directory, not
    silently in $HOME (issue 12)."""
    r = exec_(user, image, "sh", "-c", "pwd; cat here.txt; touch made", cwd=str(usr_project))
    assert r.returncode == 0, r.stderr
    assert r.stdout == f"{usr_project}\nproject-file\n"
    assert r.stderr == ""
    assert (usr_project / "made").exists()


def test_cwd_deleted_on_the_host_warns(user, image, userdir):
    gone = userdir / "gone"
    gone.mkdir()
    os.chown(gone, user.uid, user.gid)
    r = user.run(["sh", "-c", 'cd "$1" && rmdir "$1" && shift && exec "$@"', "sh", str(gone),
                  *runtime_argv("image-exec", "pwd")], env={"HPCIMAGE_IMAGE": image})
    assert r.returncode == 0, r.stderr
    assert r.stdout == f"{user.home}\n"
    assert r.stderr == (f"image-exec: warning: cannot enter {gone} in the container "
                        f"(deleted on the host); running in {user.home}\n")


def test_cwd_that_is_a_system_directory_warns(user, image):
    """/etc itself is never replaced by the host's: the command runs in the image's
    /etc, and says so; / is the container's /, silently."""
    r = exec_(user, image, "pwd", cwd="/etc")
    assert r.returncode == 0, r.stderr
    assert r.stdout == "/etc\n"
    assert r.stderr == ("image-exec: warning: cannot enter the host's /etc in the container "
                        "(a system directory: the image's own is there); running in the "
                        "image's /etc\n")
    r = exec_(user, image, "pwd", cwd="/")
    assert (r.returncode, r.stdout, r.stderr) == (0, "/\n", "")


def test_cwd_the_image_lacks_warns(user, image):
    """A system directory the image does not have (/usr/lib in the busybox image): a
    warning naming it and where the command runs."""
    r = exec_(user, image, "pwd", cwd="/usr/lib")
    assert r.returncode == 0, r.stderr
    assert r.stdout == f"{user.home}\n"
    assert r.stderr == ("image-exec: warning: cannot enter /usr/lib in the container "
                        f"(No such file or directory); running in {user.home}\n")


def test_hpcimage_exec_warns_under_the_label_of_its_errors(user, image, userdir):
    """`hpcimage exec` says `hpcimage: warning:` as it says `hpcimage: error:`, for the
    warnings said while starting (the plan's) and in the container (the chdir's)."""
    r = user.run(cli_argv("exec", image, "pwd"), cwd="/usr/lib")
    assert r.returncode == 0, r.stderr
    assert r.stderr == ("hpcimage: warning: cannot enter /usr/lib in the container "
                        f"(No such file or directory); running in {user.home}\n")
    gone = userdir / "gone"
    gone.mkdir()
    os.chown(gone, user.uid, user.gid)
    r = user.run(["sh", "-c", 'cd "$1" && rmdir "$1" && shift && exec "$@"', "sh", str(gone),
                  *cli_argv("exec", image, "pwd")])
    assert r.returncode == 0, r.stderr
    assert r.stderr == (f"hpcimage: warning: cannot enter {gone} in the container "
                        f"(deleted on the host); running in {user.home}\n")
    r = user.run(cli_argv("exec", image, "no-such-command"))
    assert r.returncode == 127
    assert r.stderr.startswith("hpcimage: error: no-such-command: command not found")


# --------------------------------------------- wrappers reached through links

@pytest.fixture
def linked_site(user, demo_sqfs):
    """The wrappers of a site with a bind, rendered under a world-readable prefix, and
    links to image-exec: absolute (/usr/local/bin style) and relative (~/bin style)."""
    from modtools import generate, write_site
    top = Path(tempfile.mkdtemp(prefix="hpcimage-links-"))
    top.chmod(0o755)
    (top / "data").mkdir()
    (top / "data" / "marker").write_text("site-bind\n")
    write_site(top, f"store: {Path(demo_sqfs).parent}\npython: {PY}\n"
                    f"binds: ['{top}/data:/site-data:ro']\n"
                    f"images:\n  - name: Demo\n    version: '1.0'\n"
                    f"    file: {Path(demo_sqfs).name}\n")
    p = generate("--site", top / "site.yaml", "--prefix", top / "out")
    assert p.returncode == 0, p.stderr
    for d in ("bin", "home/bin"):
        (top / d).mkdir(parents=True)
    (top / "bin" / "image-exec").symlink_to(top / "out" / "wrappers" / "image-exec")
    (top / "home" / "bin" / "image-exec").symlink_to("../../out/wrappers/image-exec")
    (top / "home" / "bin" / "link2").symlink_to("image-exec")      # a link to a link
    subprocess.run(["chmod", "-R", "a+rX", str(top)], check=True)
    yield top
    shutil.rmtree(top, ignore_errors=True)


@pytest.mark.parametrize("link", ["bin/image-exec", "home/bin/image-exec", "home/bin/link2"])
def test_wrapper_through_a_symlink_finds_its_site(user, demo_sqfs, linked_site, link):
    """A wrapper linked into /usr/local/bin or ~/bin reads the site.json beside its
    target: the site's binds are there (issue 12: it ran with an empty policy)."""
    env = {"HPCIMAGE_IMAGE": str(demo_sqfs), "HPCIMAGE_MODULE": "Demo/1.0"}
    r = user.run([str(linked_site / link), "cat", "/site-data/marker"], env=env)
    assert (r.returncode, r.stdout, r.stderr) == (0, "site-bind\n", "")
    # called by name from PATH, and from the link's directory as ./image-exec
    bindir = (linked_site / link).parent
    r = user.run(["sh", "-c", f"{(linked_site / link).name} cat /site-data/marker"],
                 env=dict(env, PATH=f"{bindir}:/usr/bin:/bin"))
    assert (r.returncode, r.stdout) == (0, "site-bind\n"), r.stderr
    r = user.run([f"./{(linked_site / link).name}", "sh", "-c",
                  'cat /site-data/marker; echo "${HPCIMAGE_WRAPPER-unset}"'],
                 env=env, cwd=str(bindir))
    assert (r.returncode, r.stdout) == (0, "site-bind\nunset\n"), r.stderr


def test_missing_site_json_is_an_error(user, demo_sqfs, linked_site):
    (linked_site / "out" / "wrappers" / "site.json").unlink()
    env = {"HPCIMAGE_IMAGE": str(demo_sqfs)}
    for w in (linked_site / "out" / "wrappers" / "image-exec", linked_site / "bin" / "image-exec"):
        r = user.run([str(w), "true"], env=env)
        assert r.returncode == 2
        assert r.stderr == (f"image-exec: error: site configuration {linked_site}/out/wrappers/"
                            "site.json not found (the wrappers' site.json, written by "
                            "'hpcimage generate'; HPCIMAGE_SITE_CONFIG names another)\n")
    # without the wrappers there is no site: allowed
    r = user.run(cli_argv("exec", str(demo_sqfs), "true"))
    assert r.returncode == 0, r.stderr
