"""The command starts with the process state a host shell gives it (README "What the
container sees"): signal dispositions, signal mask, umask, descriptors and the
environment, on every path that starts a program (image-exec with and without env
scripts, image-run, image-shell with sh and bash, a build's %setup, %post and %test),
compared against the same program started the same way on the host; pipes end as on
the host; and signals meant for the program leave the image's squashfuse alone.
MPI ranks (Python and hpcimage-join): tests/test_mpi.py and tests/test_mpi_runtime.py."""
import fcntl
import os
import signal
import subprocess
import time

import pytest

from conftest import PY, runtime_argv, cli_argv, fuse_processes

BUSYBOX = "/usr/bin/busybox"
# Printed by the measured program: its status lines, then its descriptors.
PROBE = "cat /proc/self/status; echo fds; ls -l /proc/self/fd"
STATE_KEYS = ("SigIgn", "SigBlk", "SigCgt", "Umask")


def parse_state(text):
    """({SigIgn, SigBlk, SigCgt, Umask}, [fd numbers]) from PROBE's output (the lister's
    own descriptor of /proc/PID/fd left out)."""
    state, fds, in_fds = {}, [], False
    for ln in text.splitlines():
        if ln == "fds":
            in_fds = True
            continue
        if not in_fds:
            k, _, v = ln.partition(":")
            if k in STATE_KEYS:
                state[k] = v.strip()
        elif " -> " in ln:
            name, target = ln.split(" -> ", 1)
            if target.startswith("/proc/") and target.endswith("/fd"):
                continue
            fds.append(int(name.split()[-1]))
    assert set(state) == set(STATE_KEYS), text
    return state, sorted(fds)


def as_user(user, argv, env, cwd=None, timeout=60, umask=0o027, passed=None):
    """argv as the test user with exactly env (no LANG added), umask 027 (not the
    default 022, so the caller's is seen), descriptor `passed` passed on."""
    kw = {}
    if passed is not None:
        kw["pass_fds"] = (passed,)
    p = subprocess.Popen(argv, env=env, cwd=cwd or user.home, user=user.uid, group=user.gid,
                         extra_groups=[], umask=umask, stdin=subprocess.DEVNULL,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         start_new_session=True, **kw)
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)       # the whole pipeline, not only bash
        out, err = p.communicate()
        raise AssertionError(f"timed out: {argv}\n{out}\n{err}")
    return subprocess.CompletedProcess(argv, p.returncode, out, err)


def base_env(user, **extra):
    env = {"HOME": user.home, "USER": user.name, "LOGNAME": user.name,
           "PATH": "/usr/local/bin:/usr/bin:/bin"}
    env.update(extra)
    return env


@pytest.fixture
def fd7(tmp_path):
    """A descriptor the caller passes (`cmd 40<file`), open on a file."""
    f = tmp_path / "passed"
    f.write_text("x")
    fd = os.open(f, os.O_RDONLY)
    passed = fcntl.fcntl(fd, fcntl.F_DUPFD, 40)      # a number pytest does not use
    os.close(fd)
    yield passed
    os.close(passed)


def host_state(user, fd7, shell=(BUSYBOX, "sh")):
    r = as_user(user, [*shell, "-c", PROBE.replace("cat ", f"{BUSYBOX} cat ")
                       .replace("ls ", f"{BUSYBOX} ls ")], base_env(user), passed=fd7)
    assert r.returncode == 0, r.stderr
    return parse_state(r.stdout)


PATHS = {
    # name: (verb, image fixture, arguments)
    "exec-direct": ("image-exec", "bare_sqfs", ["sh", "-c", PROBE]),        # no env scripts
    "exec-envscripts": ("image-exec", "demo_sqfs", ["sh", "-c", PROBE]),    # /bin/sh -c prologue
    "run": ("image-run", "demo_sqfs", ["sh", "-c", PROBE]),
    "shell": ("image-shell", "demo_dir", ["-c", PROBE]),
}


@pytest.mark.parametrize("path", sorted(PATHS))
def test_command_state_is_a_host_shells(user, path, request, fd7):
    verb, fixture, args = PATHS[path]
    image = str(request.getfixturevalue(fixture))
    want = host_state(user, fd7)
    # The launcher's own state, as Python leaves it, differs: SIGPIPE, SIGXFSZ ignored.
    r = as_user(user, runtime_argv(verb, *args), base_env(user, HPCIMAGE_IMAGE=image),
                passed=fd7)
    assert r.returncode == 0, r.stderr
    got = parse_state(r.stdout)
    assert got == want
    assert fd7 in got[1] and got[0]["Umask"] == "0027" and got[0]["SigIgn"] == "0" * 16


def test_caller_ignored_signal_stays_ignored(user, demo_sqfs):
    """nohup: SIGHUP ignored by the caller passes to the command, as from a shell."""
    ign = "0000000000000001"
    r = as_user(user, ["nohup", *runtime_argv("image-exec", "grep", "SigIgn", "/proc/self/status")],
                base_env(user, HPCIMAGE_IMAGE=str(demo_sqfs)))
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["SigIgn:", ign]
    r = as_user(user, ["nohup", BUSYBOX, "grep", "SigIgn", "/proc/self/status"], base_env(user))
    assert r.stdout.split() == ["SigIgn:", ign]


def test_bash_shell_state(user, debian_dir, fd7):
    """image-shell with the image's bash (--norc, or --rcfile with Lmod inside)."""
    want = host_state(user, fd7, shell=("bash", "--norc"))
    r = as_user(user, runtime_argv("image-shell", "-c", PROBE),
                base_env(user, HPCIMAGE_IMAGE=str(debian_dir)), passed=fd7)
    assert r.returncode == 0, r.stderr
    assert parse_state(r.stdout) == want


# ------------------------------------------------------------------------- pipes

def pipeline(user, image, cmd, timeout=20):
    """`set -o pipefail; image-exec CMD | head -1` in bash: (stdout, PIPESTATUS)."""
    script = (f'set -o pipefail; "$@" | head -1; echo "status ${{PIPESTATUS[*]}}"')
    r = as_user(user, ["bash", "-c", script, "bash", *runtime_argv("image-exec", *cmd)],
                base_env(user, HPCIMAGE_IMAGE=image), timeout=timeout)
    return r


def test_yes_into_head_dies_of_sigpipe(user, demo_sqfs):
    t = time.monotonic()
    r = pipeline(user, str(demo_sqfs), ["yes"])
    assert r.stdout.splitlines() == ["y", "status 141 0"], r.stderr
    assert "Broken pipe" not in r.stderr and time.monotonic() - t < 20


def test_endless_echo_into_head_ends(user, demo_dir):
    r = pipeline(user, str(demo_dir), ["sh", "-c", "while :; do echo x; done"])
    assert r.stdout.splitlines() == ["x", "status 141 0"], r.stderr
    assert "I/O error" not in r.stderr


# ------------------------------------------------------------------- environment

def test_no_locale_from_the_interpreter(user, demo_sqfs):
    """A caller with no LANG/LC_*: Python's C-locale coercion (LC_CTYPE=C.UTF-8) stays
    in the launcher; a caller's own LC_CTYPE=C passes unchanged."""
    env = base_env(user, HPCIMAGE_IMAGE=str(demo_sqfs))
    r = as_user(user, runtime_argv("image-exec", "env"), env)
    assert r.returncode == 0, r.stderr
    assert [ln for ln in r.stdout.splitlines() if ln.startswith(("LC_", "LANG"))] == []
    r = as_user(user, runtime_argv("image-exec", "env"), dict(env, LC_CTYPE="C"))
    assert [ln for ln in r.stdout.splitlines() if ln.startswith(("LC_", "LANG"))] == ["LC_CTYPE=C"]
    r = as_user(user, runtime_argv("image-exec", "env"), dict(env, LANG="C.UTF-8"))
    assert [ln for ln in r.stdout.splitlines() if ln.startswith(("LC_", "LANG"))] == ["LANG=C.UTF-8"]


# ----------------------------------------------------------------------- signals

def test_group_signal_leaves_the_image_served(user, demo_sqfs):
    """`kill -USR1 -PGID` (and Slurm's `scancel --signal=USR1`, which signals every
    process of the step, squashfuse included): the program's handler still reads its
    image, and nothing is left afterwards."""
    prog = ('trap \'head -1 /etc/os-release; exit 0\' USR1; echo ready; '
            'i=0; while [ $i -lt 200 ]; do sleep 0.1; i=$((i+1)); done; exit 3')
    p = subprocess.Popen(runtime_argv("image-exec", "sh", "-c", prog),
                         env=base_env(user, HPCIMAGE_IMAGE=str(demo_sqfs)), cwd=user.home,
                         user=user.uid, group=user.gid, extra_groups=[],
                         start_new_session=True, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline() == "ready\n"
        daemons = fuse_processes(user.uid)
        assert len(daemons) == 1
        assert os.getpgid(daemons[0]) != p.pid and os.getsid(daemons[0]) != p.pid
        for pid in daemons:                       # what scancel --signal=USR1 does
            os.kill(pid, signal.SIGUSR1)
        os.killpg(p.pid, signal.SIGUSR1)
        out, err = p.communicate(timeout=30)
    finally:
        if p.poll() is None:
            p.kill()
            p.communicate()
    assert p.returncode == 0, err
    assert out == 'NAME="hpcimage Demo"\n', err


# ------------------------------------------------------------------------- build

BUILD_DEF = """\
Bootstrap: busybox

%setup
    echo "== setup"; {probe}

%post
    echo "== post"; {probe}

%test
    echo "== test"; {probe}
"""


def test_build_sections_state(user, userdir, fd7):
    """%setup (on the host), %post and %test (in the image): the state of a host shell."""
    want = host_state(user, fd7)
    d = userdir / "state.def"
    d.write_text(BUILD_DEF.format(probe=PROBE))
    os.chown(d, user.uid, user.gid)
    r = as_user(user, cli_argv("build", str(userdir / "state.sqfs"), str(d)),
                base_env(user), cwd=str(userdir), timeout=300, passed=fd7)
    assert r.returncode == 0, r.stderr
    parts = {}
    for chunk in r.stdout.split("== ")[1:]:
        name, _, text = chunk.partition("\n")
        parts[name] = parse_state(text)
    assert sorted(parts) == ["post", "setup", "test"], r.stdout
    for name, got in parts.items():
        assert got[0] == want[0], name
        assert fd7 in got[1], name
