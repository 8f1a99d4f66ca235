"""Instances (issue 17): hpcimage instance start|run|list|stop|stats|logs, joining with
exec|run|shell instance://NAME, the image-instance wrapper, as the non-root user.
Each test has a HOME of its own (the state: HOME/.hpcimage/instances/HOST)."""
import json
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

from conftest import PY, cli_argv, _cached, _mksquashfs, fuse_processes, wait_no_leaks

STARTSCRIPT = """#!/bin/sh
echo "startscript: $*"
grep SigIgn /proc/self/status
echo "instance: $APPTAINER_INSTANCE $HPCIMAGE_INSTANCE"
[ $# -gt 0 ] && exec "$@"
exit 0
"""


def _instance_tree(demo_dir):
    def build(path):
        shutil.copytree(demo_dir, path, symlinks=True)
        s = Path(path) / ".singularity.d" / "startscript"
        s.write_text(STARTSCRIPT)
        s.chmod(0o755)
        app = Path(path) / "scif" / "apps" / "svc" / "scif"
        app.mkdir(parents=True)
        (app / "startscript").write_text('#!/bin/sh\necho "appstart: $*"\nexec "$@"\n')
        (app / "startscript").chmod(0o755)
    return build


@pytest.fixture(scope="session")
def inst_dir(demo_dir):
    """The demo image with a startscript that runs its arguments."""
    return _cached("instance-v2", _instance_tree(demo_dir))


@pytest.fixture(scope="session")
def inst_sqfs(inst_dir):
    return _cached("instance-v2.sqfs", lambda p: _mksquashfs(inst_dir, p))


@pytest.fixture
def home(user, userdir):
    """A HOME of the test user's own; every instance in it stopped (SIGKILL) after."""
    yield userdir
    user.run(cli_argv("instance", "stop", "-F", "--all"), env={"HOME": str(userdir)})


def hi(user, home, *args, env=None, timeout=60):
    return user.run(cli_argv(*args), env=dict({"HOME": str(home)}, **(env or {})),
                    cwd=str(home), timeout=timeout)


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def get(url, timeout=10.0):
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                return r.read().decode()
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def state_dir(home):
    return Path(home) / ".hpcimage" / "instances" / os.uname().nodename


def instance_pids(pid):
    """Processes in the PID namespace of pid (pid included)."""
    try:
        ns = os.stat(f"/proc/{pid}/ns/pid").st_ino
    except OSError:
        return []
    out = []
    for p in os.listdir("/proc"):
        if p.isdigit():
            try:
                if os.stat(f"/proc/{p}/ns/pid").st_ino == ns:
                    out.append(int(p))
            except OSError:
                pass
    return out


def gone(pid, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                    return True
        except OSError:
            return True
        time.sleep(0.02)
    return False


def listed(user, home):
    r = hi(user, home, "instance", "list", "--json")
    assert r.returncode == 0, r.stderr
    return {i["instance"]: i for i in json.loads(r.stdout)["instances"]}


# ------------------------------------------------------------------ start, list, stop

@pytest.mark.parametrize("kind", ["dir", "sqfs"])
def test_service_start_list_join_stop(user, home, inst_dir, inst_sqfs, kind):
    image = str(inst_dir if kind == "dir" else inst_sqfs)
    port = free_port()
    script = (f"echo private > /tmp/marker; mkdir /tmp/www; echo hello > /tmp/www/index.html; "
              f"exec httpd -f -p 127.0.0.1:{port} -h /tmp/www")
    r = hi(user, home, "instance", "start", "--contain", image, "web", "sh", "-c", script)
    assert r.returncode == 0, r.stderr
    assert get(f"http://127.0.0.1:{port}/") == "hello\n"        # the service answers

    r = hi(user, home, "instance", "list")
    assert r.returncode == 0, r.stderr
    head, row = r.stdout.splitlines()
    assert head.split()[:3] == ["INSTANCE", "NAME", "PID"] and "STATUS" in head
    assert row.split()[0] == "web" and row.split()[-1] == image and "running" in row
    inst = listed(user, home)["web"]
    assert inst["img"] == image and inst["status"] == "running"
    pid = inst["pid"]
    assert os.stat(f"/proc/{pid}").st_uid == user.uid

    # joined: its PID 1, its processes, its private /tmp, the instance's variables
    r = hi(user, home, "exec", "instance://web", "sh", "-c",
           "tr '\\0' ' ' < /proc/1/cmdline; echo; ps -o pid,args; cat /tmp/marker; "
           "echo \"$APPTAINER_INSTANCE $HPCIMAGE_INSTANCE\"")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert "hpcimage" in lines[0] and "instance start" in lines[0]
    assert any(ln.split()[1:2] == ["httpd"] for ln in lines[1:]), r.stdout
    assert "private" in lines and "web web" in lines
    assert not Path("/tmp/marker").exists() or Path("/tmp/marker").read_text() != "private\n"
    r = hi(user, home, "exec", "instance://web", "sh", "-c", "exit 7")
    assert r.returncode == 7

    # the startscript's output, its signal state (issue 8: nothing ignored)
    r = hi(user, home, "instance", "logs", "web")
    assert r.returncode == 0, r.stderr
    out = Path(r.stdout.split("stdout: ")[1].split()[0])
    text = out.read_text()
    assert "startscript: sh -c" in text and "instance: web web" in text
    assert "SigIgn:\t0000000000000000" in text

    r = hi(user, home, "instance", "stats", "--json", "web")
    assert r.returncode == 0, r.stderr
    s = json.loads(r.stdout)
    assert s["processes"] >= 2 and s["memory_rss"] > 0

    r = hi(user, home, "instance", "stop", "web")
    assert r.returncode == 0, r.stderr
    assert gone(pid)
    assert listed(user, home) == {}
    assert not (state_dir(home) / "web.json").exists()
    procs, mounts = wait_no_leaks(user.uid)
    assert procs == [] and mounts == []
    with pytest.raises(OSError):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2)


def test_instance_stays_after_the_startscript_and_reaps(user, home, inst_dir):
    r = hi(user, home, "instance", "start", inst_dir, "idle")       # no args: it exits
    assert r.returncode == 0, r.stderr
    deadline = time.monotonic() + 10
    while listed(user, home)["idle"]["status"] != "idle":
        assert time.monotonic() < deadline
        time.sleep(0.05)
    # an orphan's zombie is reaped by our PID 1
    r = hi(user, home, "exec", "instance://idle", "sh", "-c",
           "(sleep 0.2 &) ; sleep 1; ps -o pid,stat | awk '$2 ~ /^Z/' | wc -l")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "0"
    r = hi(user, home, "instance", "run", inst_dir, "runner")       # the runscript
    assert r.returncode == 0, r.stderr
    assert set(listed(user, home)) == {"idle", "runner"}
    r = hi(user, home, "instance", "stop", "--all")
    assert r.returncode == 0, r.stderr
    assert listed(user, home) == {}


def test_app_startscript(user, home, inst_sqfs):
    r = hi(user, home, "instance", "start", "--app", "svc", inst_sqfs, "app1", "sleep", "600")
    assert r.returncode == 0, r.stderr
    r = hi(user, home, "exec", "--app", "svc", "instance://app1", "sh", "-c",
           "echo $APPTAINER_APPNAME; ps -o args | grep -c '^sleep 600'")
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["svc", "1"]
    assert (state_dir(home) / "app1.out").read_text() == "appstart: sleep 600\n"
    r = hi(user, home, "instance", "start", "--app", "nope", inst_sqfs, "app2")
    assert r.returncode == 1 and r.stderr.count("\n") == 1, r.stderr
    assert "did not start: no app 'nope' in this image" in r.stderr
    assert set(listed(user, home)) == {"app1"}


def test_stop_kills_a_startscript_that_traps_sigterm(user, home, inst_dir):
    r = hi(user, home, "instance", "start", inst_dir, "stubborn", "sh", "-c",
           "trap 'echo got TERM' TERM; while :; do sleep 0.1; done")
    assert r.returncode == 0, r.stderr
    pid = listed(user, home)["stubborn"]["pid"]
    t = time.monotonic()
    r = hi(user, home, "instance", "stop", "-t", "1", "stubborn")
    took = time.monotonic() - t
    assert r.returncode == 0, r.stderr
    assert 1.0 <= took < 8, took
    assert "killing it" in r.stderr
    assert gone(pid) and instance_pids(pid) == []
    assert "got TERM" in (state_dir(home) / "stubborn.out").read_text()
    assert listed(user, home) == {}


def test_stop_force_and_signal(user, home, inst_dir):
    for name in ("a1", "a2", "b1"):
        r = hi(user, home, "instance", "start", inst_dir, name, "sleep", "600")
        assert r.returncode == 0, r.stderr
    t = time.monotonic()
    r = hi(user, home, "instance", "stop", "-F", "a*")
    assert r.returncode == 0, r.stderr
    assert time.monotonic() - t < 5
    assert set(listed(user, home)) == {"b1"}
    r = hi(user, home, "instance", "stop", "-s", "NOPE", "b1")
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "-s NOPE" in r.stderr
    r = hi(user, home, "instance", "stop", "-s", "INT", "b1")
    assert r.returncode == 0, r.stderr
    assert listed(user, home) == {}


def test_kill9_of_the_supervisor_leaves_nothing(user, home, inst_sqfs):
    r = hi(user, home, "instance", "start", inst_sqfs, "doomed", "sleep", "600")
    assert r.returncode == 0, r.stderr
    data = json.loads((state_dir(home) / "doomed.json").read_text())
    pids = instance_pids(data["init"])
    assert len(pids) >= 2 and fuse_processes(user.uid)
    os.kill(data["supervisor"], signal.SIGKILL)
    assert gone(data["init"])
    for p in pids:
        assert gone(p)
    procs, mounts = wait_no_leaks(user.uid)
    assert procs == [] and mounts == []
    assert listed(user, home) == {}                       # the stale entry removed
    assert not (state_dir(home) / "doomed.json").exists()
    r = hi(user, home, "exec", "instance://doomed", "true")
    assert r.returncode == 1 and "no instance 'doomed'" in r.stderr


# ------------------------------------------------------------------ names, state

@pytest.mark.parametrize("name", ["a/b", "a b", "..", "", "x" * 129, "é"])
def test_invalid_names(user, home, inst_dir, name):
    r = hi(user, home, "instance", "start", inst_dir, name)
    assert r.returncode == 2, r.stderr
    assert r.stderr.startswith("hpcimage: error: invalid instance name") and \
        r.stderr.count("\n") == 1
    assert not state_dir(home).exists() or list(state_dir(home).iterdir()) == []


def test_duplicate_name_refused(user, home, inst_dir):
    r = hi(user, home, "instance", "start", inst_dir, "dup", "sleep", "600")
    assert r.returncode == 0, r.stderr
    r = hi(user, home, "instance", "start", inst_dir, "dup", "sleep", "600")
    assert r.returncode == 1
    assert r.stderr == ("hpcimage: error: instance 'dup' already exists (or is being "
                        "started): 'hpcimage instance list' shows it\n")
    assert list(listed(user, home)) == ["dup"]


def test_concurrent_starts_one_wins(user, home, inst_sqfs):
    env = {"HOME": str(home)}
    procs = [user.popen(cli_argv("instance", "start", inst_sqfs, "race", "sleep", "600"),
                        env=env, cwd=str(home), stdout=subprocess.PIPE,
                        stderr=subprocess.PIPE, text=True) for _ in range(3)]
    res = [(p.wait(60), p.stderr.read()) for p in procs]
    assert sorted(rc for rc, _ in res) == [0, 1, 1], res
    assert all("already exists" in err for rc, err in res if rc == 1)
    assert list(listed(user, home)) == ["race"]
    init = listed(user, home)["race"]["pid"]
    assert len([p for p in instance_pids(init)]) == 2     # PID 1 and sleep: one instance


def _start_time(pid):
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[19])


def test_forged_state_files_are_ignored(user, home, inst_dir):
    d = state_dir(home)
    d.mkdir(parents=True)
    for p in (d.parent.parent, d.parent, d):
        os.chown(p, user.uid, user.gid)
    boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    # the lock held too (by a process of the user's): only the PID checks are left
    holder = user.popen(["sh", "-c", 'exec 9>"$1"; flock 9; exec sleep 600', "sh",
                         str(d / "mine.lock")])      # one process: killed, nothing left
    other = user.popen(["sleep", "600"])
    try:
        time.sleep(0.3)
        for name, pid in (("mine", other.pid), ("root", 1)):
            forged = {"version": 1, "name": name, "image": str(inst_dir), "boot_id": boot,
                      "supervisor": pid, "supervisor_start": _start_time(pid), "init": pid,
                      "init_start": _start_time(pid), "stdout": "/dev/null",
                      "stderr": "/dev/null", "started_text": "", "started": 0}
            (d / f"{name}.json").write_text(json.dumps(forged))
            os.chown(d / f"{name}.json", user.uid, user.gid)
        (d / "junk.json").write_text("{not json")
        os.chown(d / "junk.json", user.uid, user.gid)
        assert listed(user, home) == {}
        for name in ("mine", "root"):
            r = hi(user, home, "exec", f"instance://{name}", "true")
            assert r.returncode == 1 and r.stderr.count("\n") == 1, r.stderr
            r = hi(user, home, "instance", "stop", "-F", name)
            assert r.returncode == 1, r.stderr
        assert other.poll() is None                       # nobody was signalled
        assert not (d / "root.json").exists()             # stale (no lock): removed
    finally:
        for p in (holder, other):
            p.kill()
            p.wait()


# ------------------------------------------------------------------ errors

def test_error_paths(user, home, inst_dir):
    cases = [
        (("exec", "instance://nosuch", "true"), 1, "no instance 'nosuch'"),
        (("instance", "stop", "nosuch"), 1, "no instance 'nosuch'"),
        (("instance", "stats", "nosuch"), 1, "no instance 'nosuch'"),
        (("instance", "logs", "nosuch"), 1, "no instance 'nosuch'"),
        (("instance", "start", "--no-init", str(inst_dir), "x"), 2, "--no-init"),
        (("instance", "start", str(inst_dir)), 2, "no instance name given"),
        (("instance", "start", "--pid-file", "/tmp/p", str(inst_dir), "x"), 2,
         "--pid-file is an Apptainer option"),
        (("instance", "start", "--net", str(inst_dir), "x"), 2, "--net is an Apptainer"),
        (("instance", "start", "/no/such/image", "x"), 2, "/no/such/image"),
        (("instance", "stop"), 2, "no instance name given"),
        (("instance", "stop", "-t", "-1", "x"), 2, "-t -1"),
        (("instance", "list", "--user", "root"), 2, "only root"),
        (("exec", "-B", "/tmp:/x", "instance://x", "true"), 2, "-B: not for a running instance"),
    ]
    for args, rc, text in cases:
        r = hi(user, home, *args)
        assert r.returncode == rc, (args, r.stderr)
        assert r.stderr.count("\n") == 1 and text in r.stderr, (args, r.stderr)
        assert r.stderr.startswith("hpcimage: error: "), r.stderr
    r = user.run([PY, "-I", "-m", "hpcimage.runtime", "image-mpi", "--instance", "x", "true"],
                 env={"HOME": str(home), "HPCIMAGE_IMAGE": str(inst_dir)})
    assert r.returncode == 2 and "--instance" in r.stderr, r.stderr


def test_start_failure_is_one_line(user, home, inst_dir):
    r = hi(user, home, "instance", "start", "--pwd", "/no/such/dir", inst_dir, "bad")
    assert r.returncode == 1, r.stderr
    assert r.stderr.count("\n") == 1 and "did not start" in r.stderr, r.stderr
    assert listed(user, home) == {}
    assert not (state_dir(home) / "bad.json").exists()
    assert not (state_dir(home) / "bad.lock").exists()


# ------------------------------------------------------------------ wrappers, Slurm

def test_wrappers_through_a_module(user, home, inst_sqfs, tmp_path):
    from modtools import module_script
    if not Path("/usr/share/lmod/lmod/init/bash").exists():
        pytest.skip("no Lmod")
    site = tmp_path / "site"
    site.mkdir()
    store = site / "store"
    store.mkdir()
    shutil.copy(inst_sqfs, store / "Inst-1.sqfs")
    (site / "site.yaml").write_text(f"""
store: {store}
python: {PY}
images:
  - name: Inst
    version: "1"
    file: Inst-1.sqfs
    description: an image with a startscript
""")
    r = user.run(cli_argv("generate", "--site", str(site / "site.yaml"), "--prefix",
                          str(site / "out")), root=True)
    assert r.returncode == 0, r.stderr
    for p in (tmp_path, *tmp_path.parents):
        if str(p).startswith("/tmp/pytest-of-root"):
            os.chmod(p, 0o755)
    os.system(f"chmod -R a+rX {site}")
    res = module_script("lmod", f"""
export HOME={home}
module load Inst/1
image-instance start svc sleep 600 || echo start-failed
image-instance list
image-exec --instance svc sh -c 'ps -o args | grep -c "^sleep 600"; echo $HPCIMAGE_INSTANCE'
image-exec instance://svc cat /proc/1/cmdline | tr '\\0' ' '; echo
image-instance stop svc && echo stopped
image-instance list --json
""", modulepath=[str(site / "out" / "modulefiles")], user=user.name)
    assert res.rc == 0, res.err
    out = res.out.splitlines()
    assert "start-failed" not in out, res.err
    assert any(ln.startswith("svc ") and ln.endswith("Inst-1.sqfs") for ln in out), res.out
    assert "1" in out and "svc" in out, res.out
    assert any("hpcimage" in ln and "image-instance" in ln for ln in out), res.out
    assert "stopped" in out and '"instances": []' in res.out, res.out


@pytest.mark.slurm
def test_instance_in_a_slurm_job_ends_with_the_job(user, home, inst_sqfs):
    from mpitools import sbatch, slurm_start
    ok, msg = slurm_start()
    if not ok:
        pytest.skip("no Slurm test cluster: " + msg.splitlines()[-1] if msg else "")
    script = f"""#!/bin/sh
{PY} -I -m hpcimage.cli instance start {inst_sqfs} injob sleep 600 || exit 3
{PY} -I -m hpcimage.cli instance list --json > {home}/list.json
echo done
"""
    job = sbatch(user, script, home, env={"HOME": str(home)})
    assert job.state == "COMPLETED" and job.rc == 0, job.output
    data = json.loads((home / "list.json").read_text())["instances"]
    assert [i["instance"] for i in data] == ["injob"], data
    assert data[0]["job"] == job.jobid
    assert gone(data[0]["pid"], timeout=15)
    assert gone(data[0]["supervisor"], timeout=15)
    assert listed(user, home) == {}
    procs, mounts = wait_no_leaks(user.uid)
    assert procs == [] and mounts == []


def test_joining_stays_on_the_hot_path_imports(user, home, inst_dir):
    """image-exec --instance: the standard library and the runtime only (no click,
    psutil, json, re, subprocess), as image-exec."""
    r = hi(user, home, "instance", "start", inst_dir, "light", "sleep", "600")
    assert r.returncode == 0, r.stderr
    r = user.run([PY, "-X", "importtime", "-I", "-m", "hpcimage.runtime", "image-exec",
                  "--instance", "light", "true"],
                 env={"HOME": str(home), "HPCIMAGE_IMAGE": str(inst_dir)}, cwd=str(home))
    assert r.returncode == 0, r.stderr
    mods = [ln.split("|")[-1].strip() for ln in r.stderr.splitlines() if "|" in ln]
    assert "hpcimage.runtime.instance.join" in mods
    for banned in ("click", "jinja2", "yaml", "psutil", "subprocess", "json", "re", "enum",
                   "hpcimage.runtime.instance.manage"):
        assert not any(m == banned or m.startswith(banned + ".") for m in mods), banned


def test_join_refuses_start_options_wherever_they_stand(user, home, inst_dir):
    """Options placed after --instance NAME, or after a valued option, are read as the
    parser reads them: those for `instance start` are refused (exit 2), those of the
    command's process apply."""
    r = hi(user, home, "instance", "start", inst_dir, "web", "sleep", "600")
    assert r.returncode == 0, r.stderr
    env = {"HOME": str(home), "HPCIMAGE_IMAGE": str(inst_dir)}
    wrapper = [PY, "-I", "-m", "hpcimage.runtime", "image-exec"]
    cases = [
        (wrapper + ["--instance", "web", "-B", "/nonexistent", "true"], "-B"),
        (wrapper + ["--instance", "web", "--contain", "ls", "/tmp"], "--contain"),
        (cli_argv("exec", "--instance", "web", "-B", "/tmp", "true"), "-B"),
        (cli_argv("exec", "--env", "FOO=1", "-B", "/tmp", "instance://web", "true"), "-B"),
        (cli_argv("exec", "--pwd", "/", "-eC", "instance://web", "true"), "-C"),
        (cli_argv("exec", "--compat", "instance://web", "true"), "--compat"),
        (cli_argv("exec", "--overlay", "/tmp", "instance://web", "true"), "--overlay"),
        (cli_argv("exec", "--fakeroot", "instance://web", "true"), "--fakeroot"),
        (cli_argv("exec", "--writable-tmpfs", "instance://web", "true"), "--writable-tmpfs"),
    ]
    for argv, word in cases:
        r = user.run(argv, env=env, cwd=str(home))
        assert r.returncode == 2, (argv, r.stderr)
        assert r.stderr.count("\n") == 1, (argv, r.stderr)
        assert f"error: {word}: not for a running instance (instance://web)" in r.stderr, \
            (argv, r.stderr)
    # the process's options apply wherever they stand
    r = user.run(wrapper + ["--instance", "web", "--env", "A=1", "--cleanenv", "sh", "-c",
                            "echo $A ${FOO:-unset}"], env=dict(env, FOO="x"), cwd=str(home))
    assert r.returncode == 0 and r.stdout == "1 unset\n", r.stderr


def test_join_ignores_start_variables_with_a_warning(user, home, inst_dir):
    """A start option's variable: one warning line, not applied (no --cleanenv from
    APPTAINER_CONTAINALL); a false switch's says nothing."""
    r = hi(user, home, "instance", "start", inst_dir, "web", "sleep", "600")
    assert r.returncode == 0, r.stderr
    env = {"HOME": str(home)}
    r = user.run(cli_argv("exec", "instance://web", "sh", "-c", "echo ${FOO:-unset}"),
                 env=dict(env, FOO="x", APPTAINER_CONTAINALL="1", APPTAINER_BIND="/nonexistent",
                          APPTAINER_NV="false"), cwd=str(home))
    assert r.returncode == 0 and r.stdout == "x\n", r.stderr
    assert r.stderr.count("\n") == 1, r.stderr
    assert ("warning: APPTAINER_BIND, APPTAINER_CONTAINALL: not for a running instance "
            "(instance://web), ignored" in r.stderr), r.stderr


def test_stats_is_a_padded_table(user, home, inst_dir):
    """`instance stats NAME`: each cell under its header, as `instance list`."""
    r = hi(user, home, "instance", "start", inst_dir, "web", "sleep", "600")
    assert r.returncode == 0, r.stderr
    r = hi(user, home, "instance", "stats", "web")
    assert r.returncode == 0, r.stderr
    head, row = r.stdout.splitlines()
    starts = [0] + [i for i in range(2, len(head)) if head[i - 2:i] == "  " and head[i] != " "]
    assert len(starts) == 7, head
    for i in starts[1:]:
        assert row[i - 2:i] == "  " and row[i] != " ", (head, row)
