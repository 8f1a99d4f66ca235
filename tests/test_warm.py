"""Warm starts (site.yaml `warm: SECONDS`, issue 15 §4, docs/warm.md): the first
`image-exec` of a user and image in a session leaves its container standing; later
calls with the same image and options join it through hpcimage-join, without Python.
Every container test runs as the test user, each in a session of its own (setsid), so
that the session's end takes the container away before the leak check."""
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from conftest import PY, cli_argv, fuse_processes, wait_no_leaks

JOINER = Path(PY).parent.parent.glob("lib/python3*/site-packages/hpcimage/runtime/mpi/hpcimage-join")
needs_joiner = pytest.mark.skipif(not any(os.access(p, os.X_OK) for p in JOINER),
                                  reason="hpcimage-join not built (no C compiler)")

# The mount namespace of the command, and whether Python ran (the joiner's trace).
NS = "readlink /proc/self/ns/mnt"


def make_site(d, user, image, warm):
    text = (f"store: {d}\npython: {PY}\n" + (f"warm: {warm}\n" if warm is not None else "")
            + "images:\n  - name: Demo\n    version: '1.0'\n"
            f"    file: {image}\n    description: demo\n")
    (d / "site.yaml").write_text(text)
    r = user.run(cli_argv("generate", "--site", str(d / "site.yaml"), "--prefix",
                          str(d / "out")), root=True)
    subprocess.run(["chmod", "-R", "a+rX", str(d)], check=True)
    return r, d / "out" / "wrappers"


@pytest.fixture
def warm_site(user, userdir, demo_sqfs):
    image = userdir / "Demo-1.0.sqfs"
    shutil.copy(demo_sqfs, image)
    os.chmod(image, 0o644)
    r, wrappers = make_site(userdir, user, image, 30)
    assert r.returncode == 0, r.stderr
    return wrappers, image


def session(user, wrappers, image, script, env=None, timeout=60):
    """Run script (sh) as the test user in a session of its own (setsid -w): the
    session's end removes its warm containers."""
    e = {"PATH": f"{wrappers}:/usr/bin:/bin", "HPCIMAGE_IMAGE": str(image),
         "HPCIMAGE_MODULE": "Demo/1.0", "HPCIMAGE_TRACE": "1"}
    e.update(env or {})
    return user.run(["setsid", "-w", "sh", "-c", script], env=e, timeout=timeout)


def holders(uid):
    """Live warm state directories of uid: {name: holder pid}."""
    base = Path(f"/tmp/hpcimage-{uid}")
    out = {}
    for d in base.glob("warm-*") if base.is_dir() else ():
        try:
            out[d.name] = int((d / "holder").read_text())
        except (OSError, ValueError):
            out[d.name] = 0
    return out


def wait_gone(uid, timeout=8.0):
    deadline = time.monotonic() + timeout
    while (holders(uid) or fuse_processes(uid)) and time.monotonic() < deadline:
        time.sleep(0.05)
    return holders(uid), fuse_processes(uid)


# ----------------------------------------------------------------- site policy

@pytest.mark.parametrize("value, said", [
    ("-1", "warm: must be 0 or more, got -1"),
    ("soon", "warm: expected a whole number"),
    ("86401", "warm: at most 86400 seconds, got 86401"),
])
def test_site_warm_is_validated_with_its_key_path(user, userdir, value, said):
    (userdir / "x.sqfs").write_bytes(b"")
    (userdir / "site.yaml").write_text(
        f"store: {userdir}\nwarm: {value}\nimages:\n  - name: Demo\n    version: '1'\n"
        "    file: x.sqfs\n    description: d\n")
    r = user.run(cli_argv("generate", "--site", str(userdir / "site.yaml"), "--prefix",
                          str(userdir / "out")), root=True)
    assert r.returncode == 2
    assert said in r.stderr and "site.yaml:2" in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_warm_off_by_default_and_compiled_to_site_json(user, userdir, demo_sqfs):
    import json
    r, wrappers = make_site(userdir, user, demo_sqfs, None)
    assert r.returncode == 0, r.stderr
    assert "warm" not in json.loads((wrappers / "site.json").read_text())
    assert "hpcimage-join" not in (wrappers / "image-exec").read_text()
    r, wrappers = make_site(userdir, user, demo_sqfs, 45)
    assert json.loads((wrappers / "site.json").read_text())["warm"] == 45
    assert "hpcimage-join" in (wrappers / "image-exec").read_text()


# ------------------------------------------------------------------ joining

@needs_joiner
def test_second_call_joins_the_first_s_container_without_python(user, warm_site):
    wrappers, image = warm_site
    r = session(user, wrappers, image,
                f"image-exec sh -c '{NS}; cat /etc/os-release | head -1'; "
                f"image-exec sh -c '{NS}; cat /etc/os-release | head -1'; "
                "cd /tmp && image-exec sh -c 'pwd; echo $HOME'")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0] == lines[2] and lines[0].startswith("mnt:["), "one container"
    assert lines[1] == lines[3] == 'NAME="hpcimage Demo"'
    assert r.stderr.count("joined holder") == 1, r.stderr    # the second, without Python
    assert r.stderr.count("Python rank: ") == 2 and "made in another directory" in r.stderr
    assert lines[4:] == ["/tmp", user.home], "the call's own directory and environment"
    assert wait_gone(user.uid) == ({}, []), "gone with the session"


@needs_joiner
def test_joined_call_exit_status_and_signal_are_the_command_s(user, warm_site):
    wrappers, image = warm_site
    r = session(user, wrappers, image,
                "image-exec true; image-exec sh -c 'exit 3'; echo status=$?; "
                "image-exec sh -c 'kill -TERM $$'; echo status=$?; "
                "image-exec no-such-prog; echo status=$?; "
                "HPCIMAGE_WARM=0 image-exec no-such-prog; echo status=$?")
    assert r.stdout.split() == ["status=3", f"status={128 + signal.SIGTERM}", "status=127",
                                "status=127"], r.stderr
    assert r.stderr.count("joined holder") == 3, r.stderr
    said = [ln.split(" (PATH=")[0] for ln in r.stderr.splitlines() if "error" in ln]
    assert said == ["image-exec: error: no-such-prog: command not found in the image"] * 2, \
        "a joined call says what a cold one says"


@needs_joiner
def test_changed_image_is_never_joined(user, warm_site):
    """image-update and republish replace the file (a new inode): the next call is
    cold, sees the new image, and the old container is retired."""
    wrappers, image = warm_site
    new = image.with_name("new.sqfs")
    root = image.parent / "newroot"
    subprocess.run(["unsquashfs", "-q", "-d", str(root), str(image)], check=True,
                   stdout=subprocess.DEVNULL)
    (root / "etc" / "os-release").write_text('NAME="republished"\n')
    subprocess.run(["mksquashfs", str(root), str(new), "-quiet", "-no-progress", "-all-root"],
                   check=True, stdout=subprocess.DEVNULL)
    os.chmod(new, 0o644)
    r = session(user, wrappers, image,
                f"image-exec sh -c 'head -1 /etc/os-release; {NS}'; "
                f"mv {new} {image}; "
                f"image-exec sh -c 'head -1 /etc/os-release; {NS}'; "
                f"image-exec sh -c 'head -1 /etc/os-release; {NS}'")
    assert r.returncode == 0, r.stderr
    out = r.stdout.splitlines()
    assert out[0] == 'NAME="hpcimage Demo"' and out[2] == out[4] == 'NAME="republished"'
    assert out[1] != out[3] == out[5], "a new container, then joined"
    assert "the image changed" in r.stderr, r.stderr


@needs_joiner
def test_other_options_are_never_joined_and_dry_run_says(user, warm_site):
    """-e changes only the call's environment: the same container (proved by the
    plan's head), joined by Python; a bind changes the container: a new one; --contain
    (a fresh /tmp of the call's own) never starts warm."""
    wrappers, image = warm_site
    r = session(user, wrappers, image,
                "image-exec --dry-run true | grep '^# warm'; "
                f"image-exec sh -c '{NS}'; "
                "image-exec --dry-run true | grep '^# warm'; "
                "image-exec --dry-run -B /usr:/opt/x true | grep '^# warm'; "
                f"image-exec -e sh -c '{NS}'; "
                f"image-exec -B /usr:/opt/x sh -c '{NS}; ls /opt/x/bin >/dev/null'; "
                "image-exec --dry-run -c true | grep '^# warm'; "
                f"image-exec --contain sh -c '{NS}'")
    assert r.returncode == 0, r.stderr
    out = r.stdout.splitlines()
    assert out[0] == "# warm start: no, cold: no warm container; this call's stays standing 30 s idle"
    assert out[1].startswith("mnt:[")
    assert out[2].startswith("# warm start: yes, joins the warm container of holder ")
    assert out[3].startswith("# warm start: no, cold: its warm container was made for another")
    assert out[4] == out[1], "-e: the same container"
    assert out[5] not in (out[1],), "a bind: another container"
    assert "recipe made for other options" in r.stderr, r.stderr
    assert out[6] == "# warm start: no, cold: --contain gives each call its own container"
    assert out[7] not in (out[1], out[5])


# ------------------------------------------------------------------ going away

@needs_joiner
def test_gone_after_the_idle_time(user, userdir, demo_sqfs):
    r, wrappers = make_site(userdir, user, demo_sqfs, 2)
    p = user.popen(["setsid", "-w", "sh", "-c", "image-exec true; exec sleep 30"],
                   env={"PATH": f"{wrappers}:/usr/bin:/bin", "HPCIMAGE_IMAGE": str(demo_sqfs)},
                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 20
        while not holders(user.uid) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert holders(user.uid) and len(fuse_processes(user.uid)) == 1
        time.sleep(1.0)
        assert holders(user.uid), "still standing within the idle time"
        assert wait_gone(user.uid, 6.0) == ({}, []), "gone after it"
        assert p.poll() is None, "while the session goes on"
    finally:
        p.kill()
        p.wait()
        # the session's sleep, wherever p (a wrapper that runs it as the user) left it
        subprocess.run(["pkill", "-KILL", "-u", str(user.uid), "-x", "sleep"], check=False)


@needs_joiner
def test_gone_at_the_end_of_the_session_and_a_running_call_finishes(user, warm_site):
    wrappers, image = warm_site
    r = session(user, wrappers, image,
                "image-exec true; (sleep 1; image-exec sh -c 'sleep 2; echo late-ok') & exit 0")
    assert r.returncode == 0
    # The session leader has exited; the container is retired, the running call works.
    time.sleep(4)
    assert wait_gone(user.uid) == ({}, [])


@needs_joiner
def test_sigkill_of_the_holder_leaves_nothing_used(user, warm_site):
    wrappers, image = warm_site
    mark = image.parent / "first-done"
    p = user.popen(["setsid", "-w", "sh", "-c",
                    f"image-exec sh -c '{NS}'; touch {mark}; read go; image-exec sh -c '{NS}'"],
                   env={"PATH": f"{wrappers}:/usr/bin:/bin", "HPCIMAGE_IMAGE": str(image),
                        "HPCIMAGE_TRACE": "1"},
                   stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                   text=True)
    deadline = time.monotonic() + 20
    while not mark.exists() or not all(holders(user.uid).values()) or not holders(user.uid):
        assert time.monotonic() < deadline, "no holder"
        time.sleep(0.05)
    (name, pid), = holders(user.uid).items()
    assert pid > 0
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 5
    while fuse_processes(user.uid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert fuse_processes(user.uid) == [], "the image mount went with the holder"
    out, err = p.communicate("go\n", timeout=60)
    assert p.returncode == 0, err
    assert len(out.split()) == 2, (out, err)
    first, second = out.split()
    assert first != second, "a new container"
    assert "holder gone" in err and "joined holder" not in err, err
    assert wait_gone(user.uid) == ({}, [])


# ------------------------------------------------------------------ per user

@needs_joiner
@pytest.mark.parametrize("forge", ["mode", "owner"])
def test_a_state_directory_others_can_write_is_refused(user, warm_site, forge):
    wrappers, image = warm_site
    base = Path(f"/tmp/hpcimage-{user.uid}")
    shutil.rmtree(base, ignore_errors=True)
    base.mkdir(mode=0o700)
    if forge == "mode":
        os.chown(base, user.uid, user.gid)
        base.chmod(0o777)
    try:
        r = session(user, wrappers, image,
                    f"image-exec sh -c '{NS}'; image-exec sh -c '{NS}'")
        assert r.returncode == 0, r.stderr
        a, b = r.stdout.split()
        assert a != b, "nothing shared through it"
        assert "image-exec: warning: no warm start:" in r.stderr, r.stderr
        assert "joined holder" not in r.stderr
        assert list(base.iterdir()) == []
    finally:
        shutil.rmtree(base, ignore_errors=True)


@needs_joiner
def test_users_never_share(user, warm_site):
    """root's call of the same image in a session of its own gets its own state
    (/tmp/hpcimage-0) and container, never the test user's."""
    wrappers, image = warm_site
    env = {"PATH": f"{wrappers}:/usr/bin:/bin", "HPCIMAGE_IMAGE": str(image),
           "HPCIMAGE_TRACE": "1"}
    p = user.popen(["setsid", "-w", "sh", "-c", f"image-exec sh -c '{NS}'; read go"],
                   env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 20
    while not holders(user.uid) and time.monotonic() < deadline:
        time.sleep(0.05)
    r = user.run(["setsid", "-w", "sh", "-c", f"image-exec sh -c '{NS}'"],
                 env=env, root=True)
    out, _ = p.communicate("go\n", timeout=30)
    assert r.returncode == 0, r.stderr
    assert "joined holder" not in r.stderr and r.stdout != out
    assert wait_gone(user.uid) == ({}, [])
    assert wait_gone(0) == ({}, [])


def test_a_cold_only_call_leaves_no_state_directory(user, warm_site):
    """--contain never starts warm: nothing is made under /tmp for it (the joiner
    makes no state directory, only the runtime does, for a container it keeps)."""
    wrappers, image = warm_site
    base = Path(f"/tmp/hpcimage-{user.uid}")
    shutil.rmtree(base, ignore_errors=True)
    r = session(user, wrappers, image, "image-exec --contain true")
    assert r.returncode == 0, r.stderr
    assert "Python rank: state directory missing" in r.stderr, r.stderr
    assert not base.exists()


@needs_joiner
@pytest.mark.slurm
def test_gone_at_the_end_of_the_slurm_job(user, warm_site):
    """In a batch job the second call joins; the container goes with the job (the batch
    script is its session's leader; the holder is in the job's cgroup too), though the
    idle time (30 s) has not passed."""
    from mpitools import sbatch, slurm_start
    ok, msg = slurm_start()
    if not ok:
        pytest.skip("no Slurm test cluster: " + " | ".join(msg.splitlines()[-3:]))
    wrappers, image = warm_site
    script = (f"#!/bin/sh\nexport PATH={wrappers}:/usr/bin:/bin HPCIMAGE_IMAGE={image} "
              "HPCIMAGE_TRACE=1\n"
              f"image-exec sh -c '{NS}'\nimage-exec sh -c '{NS}'\n")
    b = sbatch(user, script, image.parent)
    assert b.state == "COMPLETED" and b.rc == 0, b.output
    out = [ln for ln in b.output.splitlines() if ln.startswith("mnt:[")]
    assert len(out) == 2 and out[0] == out[1], b.output
    assert b.output.count("joined holder") == 1, b.output
    assert wait_gone(user.uid, 10.0) == ({}, []), "gone with the job"
