"""Issue 14 §1-2: Apptainer's action flags and their APPTAINER_*/SINGULARITY_* variables,
as the non-root test user, through the wrappers, `hpcimage exec` and image-mpi."""
import os
import signal
import time

import pytest

from conftest import cli_argv, runtime_argv, wait_no_leaks
from hpcimage.runtime import options

SECRET = {"MYSECRET": "x"}


def wrap(user, image, *cmd, opts=(), env=None, cwd=None, umask=None):
    """image-exec OPTS CMD as the user (umask: the caller's, set by a shell first)."""
    argv = runtime_argv("image-exec", *opts, *cmd)
    if umask is not None:
        argv = ["/bin/sh", "-c", f'umask {umask}; exec "$@"', "sh"] + argv
    return user.run(argv, env={"HPCIMAGE_IMAGE": str(image), **(env or {})}, cwd=cwd)


def cli(user, image, *cmd, opts=(), env=None, cwd=None):
    return user.run(cli_argv("exec", *opts, str(image), *cmd), env=env, cwd=cwd)


def one_line_error(r, status, text):
    assert r.returncode == status, (r.returncode, r.stdout, r.stderr)
    assert text in r.stderr and r.stderr.count("\n") == 1, r.stderr


PROBE = ('echo "[$MYSECRET]"; echo $$; ls /proc | grep -c "^[0-9]"; '
         'readlink /proc/self/ns/ipc; readlink /proc/self/ns/pid')


def host_ns(kind):
    return os.readlink(f"/proc/self/ns/{kind}")


# ------------------------------------------------------------- -c, -C, --pid, --ipc

def test_containall_is_contain_cleanenv_pid_ipc(user, image):
    r = wrap(user, image, "sh", "-c", PROBE, opts=("-C",), env=SECRET)
    assert r.returncode == 0, r.stderr
    secret, pid, nproc, ipc, pidns = r.stdout.split()
    assert secret == "[]"                          # --cleanenv: the secret stays outside
    assert pid == "2" and int(nproc) <= 5          # --pid: init is 1, the command 2
    assert ipc != host_ns("ipc") and pidns != host_ns("pid")
    # --contain alone: the environment passes, the host's PID and IPC namespaces
    r = wrap(user, image, "sh", "-c", PROBE, opts=("-c",), env=SECRET)
    secret, pid, nproc, ipc, pidns = r.stdout.split()
    assert (secret, ipc, pidns) == ("[x]", host_ns("ipc"), host_ns("pid")), r.stderr
    assert int(pid) > 2
    # the long forms and hpcimage exec say the same
    r = cli(user, image, "sh", "-c", PROBE, opts=("--containall",), env=SECRET)
    assert r.stdout.split()[:2] == ["[]", "2"], r.stderr
    assert wait_no_leaks(user.uid) == ([], [])


def test_combined_short_flags(user, demo_dir, userdir):
    (userdir / "f").write_text("bound\n")
    for opts in (("-eC",), ("-Ce",)):
        r = cli(user, demo_dir, "sh", "-c", PROBE, opts=opts, env=SECRET)
        assert r.stdout.split()[:2] == ["[]", "2"], (opts, r.stderr)
    r = wrap(user, demo_dir, "sh", "-c", 'echo "[$MYSECRET]"; cat /data/f; echo $$',
             opts=("-ec", f"-eB{userdir}:/data"), env=SECRET)
    secret, bound, pid = r.stdout.split()
    assert (secret, bound) == ("[]", "bound") and int(pid) > 2, r.stderr
    r = wrap(user, demo_dir, "sh", "-c", "cat /data/f", opts=("-eB", f"{userdir}:/data"))
    assert r.stdout == "bound\n", r.stderr
    one_line_error(wrap(user, demo_dir, "true", opts=("-en",)), 2,
                   "image-exec: error: -n (--net) is an Apptainer option that hpcimage "
                   "does not support")
    one_line_error(wrap(user, demo_dir, "true", opts=("-eZ",)), 2, "no such option: -Z")
    one_line_error(user.run(runtime_argv("image-exec", "-eB"),
                            env={"HPCIMAGE_IMAGE": str(demo_dir)}), 2,
                   "option -B needs a value")
    one_line_error(wrap(user, demo_dir, "true", opts=("--hostname", "")), 2,
                   "option --hostname needs a value")


def test_pid_namespace_init_and_no_init(user, demo_dir):
    r = wrap(user, demo_dir, "sh", "-c", "echo $$; ps -o pid,comm | wc -l", opts=("--pid",))
    assert r.stdout.split()[0] == "2", r.stderr
    r = wrap(user, demo_dir, "sh", "-c", "echo $$", opts=("--pid", "--no-init"))
    assert r.stdout == "1\n", r.stderr
    r = wrap(user, demo_dir, "sh", "-c", "ls /proc | grep -c '^[0-9]'", opts=("-p",))
    assert int(r.stdout) <= 4, r.stdout      # init, sh, ls, grep: not the host's
    # the command's exit status, 128+N for a signal
    assert wrap(user, demo_dir, "sh", "-c", "exit 7", opts=("--pid",)).returncode == 7
    assert wrap(user, demo_dir, "sh", "-c", "exit 7",
                opts=("--pid", "--no-init")).returncode == 7
    r = wrap(user, demo_dir, "sh", "-c", "kill -TERM $$", opts=("--pid",))
    assert r.returncode == 128 + signal.SIGTERM
    assert wait_no_leaks(user.uid) == ([], [])


def test_pid_namespace_forwards_signals(user, demo_dir):
    """SIGTERM to the launcher reaches the command (through the init) and its exit status
    comes back; nothing is left."""
    p = user.popen(runtime_argv("image-exec", "--pid", "sh", "-c",
                                'trap "echo got-term; exit 3" TERM; echo ready; '
                                'while :; do sleep 0.1; done'),
                   env={"HPCIMAGE_IMAGE": str(demo_dir)}, stdout=-1, stderr=-1, text=True)
    assert p.stdout.readline() == "ready\n"
    time.sleep(0.2)
    p.send_signal(signal.SIGTERM)
    out, err = p.communicate(timeout=30)
    assert p.returncode == 3 and out == "got-term\n", (p.returncode, out, err)
    assert wait_no_leaks(user.uid) == ([], [])


def test_ipc_uts_and_hostname(user, demo_dir):
    r = wrap(user, demo_dir, "sh", "-c", "readlink /proc/self/ns/ipc", opts=("--ipc",))
    assert r.stdout.strip() not in ("", host_ns("ipc")), r.stderr
    host = os.uname().nodename
    r = wrap(user, demo_dir, "sh", "-c", "hostname; readlink /proc/self/ns/uts",
             opts=("--hostname", "box1"))
    assert r.stdout.split() [0] == "box1" and r.stdout.split()[1] != host_ns("uts"), r.stderr
    assert os.uname().nodename == host
    r = wrap(user, demo_dir, "sh", "-c", "hostname; readlink /proc/self/ns/uts",
             opts=("--uts",))
    name, uts = r.stdout.split()
    assert name == host and uts != host_ns("uts"), r.stderr


# ------------------------------------------------------ home, cwd, umask, scratch

def test_home_flag(user, demo_dir, userdir):
    r = wrap(user, demo_dir, "sh", "-c", 'echo "$HOME"; echo hi > "$HOME/made"; '
             'grep "^$(id -un):" /etc/passwd | cut -d: -f6', opts=("-H", f"{userdir}:/myhome"))
    assert r.stdout.split() == ["/myhome", "/myhome"], r.stderr
    assert (userdir / "made").read_text() == "hi\n"
    r = wrap(user, demo_dir, "sh", "-c", 'echo "$HOME"; ls "$HOME"', opts=("--home", str(userdir)))
    assert r.stdout.split() == [str(userdir), "made"], r.stderr
    # under --contain the given home is still bound (as Apptainer's) and the start
    r = wrap(user, demo_dir, "sh", "-c", "pwd; ls", opts=("-c", "-H", f"{userdir}:/h"))
    assert r.stdout.split() == ["/h", "made"], r.stderr
    one_line_error(wrap(user, demo_dir, "true", opts=("-H", "/no/such")), 2,
                   "--home /no/such: /no/such is not a directory")
    one_line_error(wrap(user, demo_dir, "true", opts=("-H", f"{userdir}:rel")), 2,
                   "the destination must be an absolute path")
    one_line_error(wrap(user, demo_dir, "true", opts=("-H", "a:b:c")), 2,
                   "--home a:b:c: want SRC[:DST]")


def test_cwd_is_pwd(user, demo_dir):
    assert wrap(user, demo_dir, "pwd", opts=("--cwd", "/etc")).stdout == "/etc\n"
    assert cli(user, demo_dir, "pwd", opts=("--cwd=/etc",)).stdout == "/etc\n"
    one_line_error(wrap(user, demo_dir, "pwd", opts=("--cwd", "/no/such")), 2,
                   "--pwd /no/such: no such directory in the container")
    one_line_error(user.run(runtime_argv("image-exec", "--cwd"),
                            env={"HPCIMAGE_IMAGE": str(demo_dir)}), 2,
                   "option --cwd needs a value")


def test_no_umask(user, demo_dir):
    assert wrap(user, demo_dir, "sh", "-c", "umask", umask="077").stdout == "0077\n"
    r = wrap(user, demo_dir, "sh", "-c", "umask", umask="077", opts=("--no-umask",))
    assert r.stdout == "0022\n", r.stderr


def test_scratch_and_workdir(user, demo_dir, userdir):
    r = wrap(user, demo_dir, "sh", "-c", "ls -A /scr | wc -l; touch /scr/a /s2/b && echo ok",
             opts=("-S", "/scr,/s2"))
    assert r.stdout.split() == ["0", "ok"], r.stderr
    wd = userdir / "wd"
    r = wrap(user, demo_dir, "sh", "-c", 'touch /scr/a /tmp/t /var/tmp/v "$HOME/h" && pwd',
             opts=("-c", "-W", str(wd), "--scratch", "/scr"))
    assert r.returncode == 0, r.stderr
    for f in ("scratch/scr/a", "tmp/t", "var_tmp/v", "home/h"):
        assert (wd / f).exists(), f
    assert (wd / "tmp").stat().st_mode & 0o7777 == 0o1777
    # kept: a second launch sees the first one's scratch
    r = wrap(user, demo_dir, "ls", "/scr", opts=("-W", str(wd), "-S", "/scr"))
    assert r.stdout == "a\n", r.stderr
    one_line_error(wrap(user, demo_dir, "true", opts=("-S", "rel")), 2,
                   "--scratch wants an absolute path, got 'rel'")
    r = wrap(user, demo_dir, "true", opts=("-W", "/proc/no", "-S", "/scr"))
    assert r.returncode == 1 and "launch step 'workdir' failed" in r.stderr, r.stderr


def test_compat(user, demo_dir):
    r = wrap(user, demo_dir, "sh", "-c", 'echo "$$ [$MYSECRET]"; umask', umask="077",
             opts=("--compat",), env=SECRET)
    assert r.stdout.split() == ["1", "[]", "0022"], r.stderr     # --no-init: PID 1
    assert r.stderr == ""
    # --compat's --writable-tmpfs: the root is writable, on a tmpfs (docs/overlays.md)
    r = wrap(user, demo_dir, "sh", "-c", "echo x > /compat-file && cat /compat-file",
             opts=("--compat",))
    assert (r.returncode, r.stdout, r.stderr) == (0, "x\n", "")


def test_accepted_for_the_environment_and_binds_owners(user, demo_dir):
    """--env-file, --no-eval, --no-mount: parsed into Options (their effect: §3, §4)."""
    o = options.parse(["exec", "--env-file", "f", "--no-eval", "--no-mount", "home,tmp",
                       "--no-mount=cwd", "img", "true"], {})
    assert (o.env_file, o.no_eval, o.no_mount) == ("f", True, ["home", "tmp", "cwd"])
    o = options.parse(["exec", "img", "true"], {"APPTAINER_NO_MOUNT": "tmp, cwd",
                                                "SINGULARITY_ENV_FILE": "g",
                                                "APPTAINER_NO_EVAL": "1"})
    assert (o.env_file, o.no_eval, o.no_mount) == ("g", True, ["tmp", "cwd"])


# -------------------------------------------------------------- what is refused

@pytest.mark.parametrize("words,name", [
    (("--net",), "--net"), (("--network", "bridge"), "--network"),
    (("--security", "seccomp:x"), "--security"), (("--apply-cgroups", "c.toml"), "--apply-cgroups"),
    (("--dns", "1.1.1.1"), "--dns"), (("--fusemount", "x"), "--fusemount"),
    (("--keep-privs",), "--keep-privs"), (("--userns",), "--userns"), (("-u",), "-u (--userns)"),
    (("--boot",), "--boot"), (("--memory=1G",), "--memory"),
])
def test_apptainer_options_hpcimage_lacks(user, demo_dir, words, name):
    want = f"{name} is an Apptainer option that hpcimage does not support"
    one_line_error(wrap(user, demo_dir, "true", opts=words), 2, "image-exec: error: " + want)
    one_line_error(cli(user, demo_dir, "true", opts=words), 2, "hpcimage: error: " + want)


# ------------------------------------------------------------------ the variables

def test_variables_of_the_options(user, demo_dir, userdir):
    (userdir / "f").write_text("bound\n")
    cases = [
        ({"APPTAINER_CONTAINALL": "1"}, 'echo "[$MYSECRET] $$"', "[] 2"),
        ({"SINGULARITY_CONTAINALL": "true"}, 'echo "[$MYSECRET] $$"', "[] 2"),
        ({"APPTAINER_CLEANENV": "1"}, 'echo "[$MYSECRET]"', "[]"),
        ({"SINGULARITY_CLEANENV": "T"}, 'echo "[$MYSECRET]"', "[]"),
        ({"APPTAINER_CLEANENV": "false"}, 'echo "[$MYSECRET]"', "[x]"),
        ({"APPTAINER_BINDPATH": f"{userdir}:/data"}, "cat /data/f", "bound"),
        ({"SINGULARITY_BINDPATH": f"{userdir}:/data"}, "cat /data/f", "bound"),
        ({"SINGULARITY_BIND": f"{userdir}:/data:ro"}, "cat /data/f", "bound"),
        ({"APPTAINER_PWD": "/etc"}, "pwd", "/etc"),
        ({"APPTAINER_CWD": "/etc"}, "pwd", "/etc"),
        ({"SINGULARITY_TARGET_PWD": "/etc"}, "pwd", "/etc"),
        ({"APPTAINER_HOME": f"{userdir}:/hh"}, 'echo "$HOME"; cat "$HOME/f"', "/hh bound"),
        ({"APPTAINER_PID": "1"}, "echo $$", "2"),
        ({"APPTAINER_UNSHARE_PID": "1", "APPTAINER_NOSHIMINIT": "1"}, "echo $$", "1"),
        ({"APPTAINER_HOSTNAME": "box2"}, "hostname", "box2"),
        ({"APPTAINER_SCRATCH": "/s1,/s2"}, "ls -d /s1 /s2", "/s1 /s2"),
        ({"APPTAINER_CONTAIN": "1"}, "ls -A /tmp | wc -l", "0"),
    ]
    for env, cmd, want in cases:
        r = wrap(user, demo_dir, "sh", "-c", cmd, env={**SECRET, **env}, cwd=str(userdir))
        assert " ".join(r.stdout.split()) == want and r.returncode == 0, (env, r.stdout, r.stderr)
        assert r.stderr == "", (env, r.stderr)
    r = wrap(user, demo_dir, "sh", "-c", "umask", env={"APPTAINER_NO_UMASK": "1"}, umask="077")
    assert r.stdout == "0022\n"
    r = wrap(user, demo_dir, "sh", "-c", "ls -A $HOME | wc -l",
             env={"APPTAINER_NO_HOME": "1"}, cwd="/")
    assert r.stdout.strip() == "0", r.stderr
    # --nv's and --rocm's variables plan what the options plan
    for flag, var in (("--nv", "APPTAINER_NV"), ("--rocm", "SINGULARITY_ROCM")):
        a = wrap(user, demo_dir, "true", opts=("--dry-run", flag))
        b = wrap(user, demo_dir, "true", opts=("--dry-run",), env={var: "1"})
        planned = [ln for ln in b.stdout.splitlines() if var not in ln]
        assert a.stdout.splitlines() == planned and a.returncode == 0, (a.stderr, b.stderr)


def test_variable_precedence(user, demo_dir, userdir):
    # the command line wins over a variable
    r = wrap(user, demo_dir, "pwd", opts=("--pwd", "/bin"), env={"APPTAINER_PWD": "/etc"})
    assert r.stdout == "/bin\n" and r.stderr == "", r.stderr
    # APPTAINER_ wins over SINGULARITY_, with a warning where they differ
    r = wrap(user, demo_dir, "pwd", env={"APPTAINER_PWD": "/etc", "SINGULARITY_PWD": "/bin"})
    assert r.stdout == "/etc\n"
    assert r.stderr == ("image-exec: warning: SINGULARITY_PWD and APPTAINER_PWD have "
                        "different values, using APPTAINER_PWD\n")
    r = wrap(user, demo_dir, "pwd", env={"APPTAINER_PWD": "/etc", "SINGULARITY_PWD": "/etc"})
    assert r.stdout == "/etc\n" and r.stderr == ""
    r = wrap(user, demo_dir, "pwd", env={"APPTAINER_PWD": "", "SINGULARITY_PWD": "/etc"})
    assert r.stdout == "/etc\n" and r.stderr == ""     # an empty APPTAINER_X is unset
    # bind variables add to -B (both apply)
    (userdir / "f").write_text("bound\n")
    r = wrap(user, demo_dir, "sh", "-c", "cat /a/f /b/f", opts=("-B", f"{userdir}:/b"),
             env={"APPTAINER_BIND": f"{userdir}:/a"})
    assert r.stdout == "bound\nbound\n", r.stderr
    # a bad boolean is an error naming the variable; an empty value is unset
    one_line_error(wrap(user, demo_dir, "true", env={"APPTAINER_CONTAIN": "maybe"}), 2,
                   "APPTAINER_CONTAIN=maybe: want true or false (as --contain)")
    r = wrap(user, demo_dir, "sh", "-c", 'echo "[$MYSECRET]"',
             env={**SECRET, "APPTAINER_CLEANENV": ""})
    assert r.stdout == "[x]\n"


def test_variables_of_options_hpcimage_lacks_warn_once(user, demo_dir):
    r = wrap(user, demo_dir, "echo", "ran", env={"APPTAINER_NET": "1",
                                                  "SINGULARITY_SECURITY": "seccomp:x",
                                                  "APPTAINER_CACHEDIR": "/tmp"})
    assert r.returncode == 0 and r.stdout == "ran\n"
    lines = r.stderr.splitlines()
    assert sorted(lines) == [
        "image-exec: warning: APPTAINER_NET is set: --net is an Apptainer option that "
        "hpcimage does not support (ignored)",
        "image-exec: warning: SINGULARITY_SECURITY is set: --security is an Apptainer "
        "option that hpcimage does not support (ignored)"], r.stderr


def test_reading_variables_costs_one_pass():
    """No APPTAINER_/SINGULARITY_ variable: from_environ returns after the one pass."""
    o = options.Options("exec", "image-exec")
    options.from_environ(o, {"PATH": "/bin", "HOME": "/h"})
    assert o.binds == [] and o.warnings == []
    # an option's first variable in Apptainer's order wins, whatever the environment's
    o = options.parse(["exec", "img", "x"], {"APPTAINER_TARGET_PWD": "/b",
                                             "APPTAINER_PWD": "/a"})
    assert o.pwd == "/a"
    o = options.parse(["exec", "img", "x"], {"SINGULARITY_SCRATCHDIR": "/b",
                                             "SINGULARITY_SCRATCH": "/a"})
    assert o.scratch == ["/a"]


# ---------------------------------------------------------------------- image-mpi

def test_image_mpi_keeps_launcher_short_forms_and_refuses_namespaces(user, demo_sqfs,
                                                                     userdir):
    bindir = userdir / "bin"
    bindir.mkdir()
    (bindir / "srun").write_text('#!/bin/sh\necho srun "$@"\n')
    (bindir / "srun").chmod(0o755)
    env = {"HPCIMAGE_IMAGE": str(demo_sqfs), "PATH": f"{bindir}:/usr/bin:/bin",
           "SLURM_JOB_ID": "1"}
    r = user.run(runtime_argv("image-mpi", "-eC", "-c", "2", "-p", "debug", "--no-umask",
                              "--cwd", "/tmp", "./solver"), env=env)
    assert r.returncode == 0, r.stderr
    words = r.stdout.split()
    rank = words.index("image-mpi-rank")
    assert words[1:rank] != [] and {"-eC", "-c", "2", "-p", "debug"} <= set(words[1:rank])
    assert words[rank:][:7] == ["image-mpi-rank", "--mpi-mode", "hybrid", "--no-umask",
                                "--cwd", "/tmp", "--"]
    for words, env2 in ((("--pid",), {}), (("--containall",), {}), (("--hostname", "x"), {}),
                        (("--compat",), {}), ((), {"APPTAINER_CONTAINALL": "1"})):
        r = user.run(runtime_argv("image-mpi", *words, "./solver"), env={**env, **env2})
        assert r.returncode == 2 and "is not supported by image-mpi" in r.stderr, r.stderr
        assert r.stderr.count("\n") == 1 and r.stdout == ""


def test_help_is_the_option_table(user, demo_dir):
    r = user.run(runtime_argv("image-exec", "--help"), env={"HPCIMAGE_IMAGE": str(demo_dir)})
    for name, attr, valued, where, env, doc in options.FLAGS:
        if doc is not None:
            assert name in r.stdout, name
    assert "-C, --containall" in r.stdout and "-c, --contain" in r.stdout
    r = user.run(runtime_argv("image-mpi", "--help"))
    assert "--no-umask" in r.stdout and "--scratch" in r.stdout and "--pid" not in r.stdout
