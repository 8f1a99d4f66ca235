"""`hpcimage doctor`, as the test user and as root, on this machine as it is and with
each fault made real without touching the machine: in a private mount namespace
(a device, a program or /etc/subuid covered by a bind), or in a user namespace whose
max_user_namespaces is 0 (the limit is per namespace)."""
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from conftest import PY, REPO, cli_argv

NAMES = ["user-namespaces", "dev-fuse", "squashfuse", "session-directory", "site-config",
         "overlayfs", "fuse-overlayfs", "fuse2fs", "gocryptfs", "gpgv", "subordinate-ids", "lmod",
         "environment-modules", "mpi-joiner"]
NEEDED = {"user-namespaces", "dev-fuse", "squashfuse", "session-directory", "site-config"}
JOINER = subprocess.run([PY, "-I", "-c", "import hpcimage.runtime.mpi.recipe as m; "
                         "print(m.JOIN_HELPER)"], capture_output=True, text=True,
                        check=True).stdout.strip()
TOOL_DIRS = ("/usr/bin", "/usr/sbin", "/usr/local/bin", "/sbin")
TOOLS = ("fuse-overlayfs", "fuse2fs", "gocryptfs", "gpgv")     # WARN when missing

# Runs argv[3:] in a new mount namespace (private propagation), and with argv[1] == "1"
# a new user namespace that maps every id onto itself and whose max_user_namespaces is
# 0, after the sh commands argv[2] ran there as root.
NSRUN = r"""
import os, subprocess, sys
from hpcimage.linux import syscalls as sc
limit, setup, argv = sys.argv[1] == "1", sys.argv[2], sys.argv[3:]
r, w = os.pipe()
r2, w2 = os.pipe()
pid = os.fork()
if pid == 0:
    sc.unshare(sc.CLONE_NEWNS | (sc.CLONE_NEWUSER if limit else 0))
    os.write(w2, b"x")
    os.read(r, 1)
    sc.mount(None, "/", None, sc.MS_REC | sc.MS_PRIVATE)
    if limit:
        with open("/proc/sys/user/max_user_namespaces", "w") as f:
            f.write("0")
    subprocess.run(["sh", "-ec", setup], check=True)
    os.execvp(argv[0], argv)
os.read(r2, 1)
if limit:
    for f in ("uid_map", "gid_map"):
        with open(f"/proc/{pid}/{f}", "w") as fh:
            fh.write("0 0 4294967295\n")
os.write(w, b"x")
_, st = os.waitpid(pid, 0)
sys.exit(os.waitstatus_to_exitcode(st))
"""


def _parse(stdout):
    return {d["name"]: d for d in json.loads(stdout)}


def doctor(user, *args, env=None, root=False, setup=None, limit_userns=False):
    """`hpcimage doctor --json ARGS` as the test user (or root): (exit status, {name:
    line}, stderr). With setup (sh commands, run as root) or limit_userns, in fresh
    namespaces (NSRUN)."""
    argv = cli_argv("doctor", "--json", *args)
    if setup is None and not limit_userns:
        r = user.run(argv, env=env, root=root, timeout=60)
    else:
        if not root:
            argv = ["setpriv", f"--reuid={user.uid}", f"--regid={user.gid}",
                    "--clear-groups", *argv]
        e = user.env(env) if not root else dict(user.env(env), HOME="/root", USER="root",
                                                  LOGNAME="root")
        r = subprocess.run([PY, "-c", NSRUN, "1" if limit_userns else "0", setup or ":",
                            *argv], env=e, cwd="/", capture_output=True, text=True,
                           timeout=60)
    lines = _parse(r.stdout) if r.stdout else {}
    return r.returncode, lines, r.stderr


@pytest.fixture
def rendered(userdir):
    """A site rendered into a directory the test user reads: (site.yaml, wrappers)."""
    site = userdir / "site.yaml"
    site.write_text((REPO / "site.yaml").read_text())
    subprocess.run(cli_argv("generate", "--site", str(site)), check=True,
                   capture_output=True)
    subprocess.run(["chmod", "-R", "a+rX", str(userdir)], check=True)
    return site, userdir / "wrappers"


def _tool_installed(name):
    return any(os.access(os.path.join(d, name), os.X_OK) for d in TOOL_DIRS)


# ---------------------------------------------------------------- this machine

@pytest.mark.parametrize("as_root", [False, True], ids=["hpcuser", "root"])
def test_this_machine_can_start_containers(user, rendered, as_root):
    site, wrappers = rendered
    env = {"PATH": f"{wrappers}:/usr/local/bin:/usr/bin:/bin"}    # as after module load
    r = user.run(cli_argv("doctor", "--site", str(site)), env=env, root=as_root, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stderr == ""
    out = r.stdout
    status = {ln.split()[1].rstrip(":"): ln.split()[0] for ln in out.splitlines()
              if ln.split()[0] in ("OK", "WARN", "FAIL")}
    assert list(status) == NAMES
    for name in NAMES:
        want = "OK"
        if name in TOOLS and not _tool_installed(name):
            want = "WARN"
        if name == "mpi-joiner" and not os.access(JOINER, os.X_OK):
            want = "WARN"
        assert status[name] == want, out
    who = " (as nobody: what users get)" if as_root else ""
    assert f"a test namespace worked{who}\n" in out
    assert f"OK    dev-fuse: /dev/fuse (mode 0666) opened read-write{who}\n" in out
    assert "OK    squashfuse: the runtime uses /usr/bin/squashfuse_ll" in out
    assert ("OK    session-directory: /var/lib/hpcimage/mnt; a tmpfs mounted on it in a "
            "user namespace\n") in out
    assert (f"OK    site-config: {wrappers}/site.json (beside {wrappers}/image-exec): "
            f"current with {site}\n") in out
    if not as_root:
        assert (f"OK    subordinate-ids: {user.name}: uids 100000+65536 (/etc/subuid)"
                in out)
    assert "OK    lmod: /usr/share/lmod/lmod/libexec/lmod" in out
    warns = sum(s == "WARN" for s in status.values())
    assert out.endswith("result: containers can start here"
                        + (f" ({warns} warning{'s' if warns > 1 else ''})" if warns else "")
                        + "\n")


def test_json_is_a_list_of_lines(user, rendered):
    site, wrappers = rendered
    r = user.run(cli_argv("doctor", "--json", "--site-config", str(wrappers / "site.json")),
                 timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    data = json.loads(r.stdout)
    assert isinstance(data, list)
    assert [d["name"] for d in data] == NAMES
    for d in data:
        assert set(d) == {"name", "status", "detail", "fix"}
        assert d["status"] in ("OK", "WARN", "FAIL")
        assert isinstance(d["detail"], str) and d["detail"]
        assert (d["fix"] is None) == (d["status"] == "OK"), d
    site_line = next(d for d in data if d["name"] == "site-config")
    assert site_line == {"name": "site-config", "status": "OK", "fix": None,
                         "detail": f"{wrappers}/site.json (--site-config): format version 1 "
                                   "(pass --site site.yaml to compare it with its source)"}


# ------------------------------------------------------------- user namespaces

@pytest.mark.parametrize("as_root", [False, True], ids=["hpcuser", "root"])
def test_no_user_namespaces_fails(user, as_root):
    rc, lines, err = doctor(user, root=as_root, limit_userns=True)
    assert rc == 1, (lines, err)
    ns = lines["user-namespaces"]
    assert ns["status"] == "FAIL"
    assert ns["detail"].startswith("user.max_user_namespaces=0; a test namespace failed")
    assert ns["detail"].endswith("unshare(CLONE_NEWUSER): No space left on device")
    assert ns["fix"].startswith("sysctl -w user.max_user_namespaces=15000")
    assert lines["overlayfs"] == {"name": "overlayfs", "status": "WARN",
                                  "detail": "not tried: no user namespace (above)",
                                  "fix": lines["overlayfs"]["fix"]}
    assert lines["session-directory"]["detail"] == "/var/lib/hpcimage/mnt"
    others = {n: d["status"] for n, d in lines.items() if n != "user-namespaces"}
    assert "FAIL" not in others.values()


def test_text_names_the_failure_and_the_fix(user):
    argv = ["setpriv", f"--reuid={user.uid}", f"--regid={user.gid}", "--clear-groups",
            *cli_argv("doctor")]
    r = subprocess.run([PY, "-c", NSRUN, "1", ":", *argv], env=user.env(), cwd="/",
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 1
    out = r.stdout.splitlines()
    i = next(k for k, ln in enumerate(out) if ln.startswith("FAIL  user-namespaces: "))
    assert out[i + 1].startswith("      fix: sysctl -w user.max_user_namespaces=15000")
    assert out[-1].startswith("result: containers cannot start here: 1 failed (")


# ------------------------------------------------------------------ /dev/fuse

FUSE_0600 = ('d=$(mktemp -d); mount -t tmpfs tmpfs "$d"; mknod -m 0600 "$d/fuse" c 10 229; '
             'mount --bind "$d/fuse" /dev/fuse')


@pytest.mark.parametrize("as_root", [False, True], ids=["hpcuser", "root"])
def test_dev_fuse_not_usable_by_users_fails(user, as_root):
    rc, lines, err = doctor(user, root=as_root, setup=FUSE_0600)
    assert rc == 1, (lines, err)
    who = " (as nobody: what users get)" if as_root else ""
    assert lines["dev-fuse"] == {
        "name": "dev-fuse", "status": "FAIL",
        "detail": f"/dev/fuse (mode 0600): cannot open read-write{who}: Permission denied",
        "fix": 'chmod 0666 /dev/fuse, and make it last: a udev rule KERNEL=="fuse", '
               'MODE="0666" in /etc/udev/rules.d/99-fuse.rules'}
    assert lines["user-namespaces"]["status"] == "OK"


def test_dev_fuse_missing_fails(user):
    rc, lines, err = doctor(user, setup="mount -t tmpfs tmpfs /dev")
    assert rc == 1, (lines, err)
    assert lines["dev-fuse"]["status"] == "FAIL"
    assert lines["dev-fuse"]["detail"] == "/dev/fuse: missing"
    assert lines["dev-fuse"]["fix"].startswith("modprobe fuse")


# ----------------------------------------------------------------- squashfuse

HIDE = "for p in {}; do mount --bind /dev/null /usr/bin/$p; done"


def test_no_squashfuse_fails(user):
    rc, lines, err = doctor(user, setup=HIDE.format("squashfuse squashfuse_ll"))
    assert rc == 1, (lines, err)
    sq = lines["squashfuse"]
    assert sq["status"] == "FAIL"
    assert sq["detail"].startswith("neither squashfuse_ll nor squashfuse on PATH")
    assert sq["fix"].startswith("install squashfuse (Debian/Ubuntu: apt install squashfuse")


def test_single_threaded_squashfuse_warns(user):
    rc, lines, err = doctor(user, setup=HIDE.format("squashfuse_ll"))
    assert rc == 0, (lines, err)
    sq = lines["squashfuse"]
    assert sq["status"] == "WARN"
    assert sq["detail"].startswith("the runtime uses /usr/bin/squashfuse (single-threaded")
    assert sq["fix"].startswith("install squashfuse_ll")


def test_squashfuse_override_not_executable_fails(user, userdir):
    rc, lines, _ = doctor(user, env={"HPCIMAGE_SQUASHFUSE": str(userdir / "nope")})
    assert rc == 1
    assert lines["squashfuse"]["status"] == "FAIL"
    assert lines["squashfuse"]["detail"] == (f"HPCIMAGE_SQUASHFUSE={userdir}/nope: not an "
                                             "executable file")


# ---------------------------------------------------------- session directory

def test_session_directory_missing_fails(user, userdir):
    rc, lines, _ = doctor(user, env={"HPCIMAGE_SESSION_DIR": str(userdir / "absent")})
    assert rc == 1
    sd = lines["session-directory"]
    assert sd["status"] == "FAIL"
    assert sd["detail"] == f"HPCIMAGE_SESSION_DIR={userdir}/absent: No such file or directory"


def test_session_directory_fallback_warns(user):
    rc, lines, err = doctor(user, setup="mount -t tmpfs tmpfs /var/lib/hpcimage")
    assert rc == 0, (lines, err)
    sd = lines["session-directory"]
    assert sd["status"] == "WARN"
    assert sd["detail"].startswith("/mnt: a fallback, because /var/lib/hpcimage/mnt is "
                                   "missing; a tmpfs mounted on it")
    assert sd["fix"].startswith("mkdir -p /var/lib/hpcimage/mnt")


# ----------------------------------------------------------------- site.json

def test_site_config_missing_fails(user, userdir):
    rc, lines, _ = doctor(user, env={"HPCIMAGE_SITE_CONFIG": str(userdir / "site.json")})
    assert rc == 1
    sc = lines["site-config"]
    assert sc["status"] == "FAIL"
    assert sc["detail"] == f"{userdir}/site.json (HPCIMAGE_SITE_CONFIG): missing"


def test_site_config_unreadable_json_fails(user, userdir):
    bad = userdir / "site.json"
    bad.write_text("{not json\n")
    rc, lines, _ = doctor(user, "--site-config", str(bad))
    assert rc == 1
    assert lines["site-config"]["status"] == "FAIL"
    assert lines["site-config"]["detail"].startswith(f"{bad}: unreadable site configuration")


def test_site_config_unknown_key_fails(user, userdir):
    """A key this hpcimage does not know makes every launch fail (config.policy): the
    doctor says so instead of calling the file current."""
    bad = userdir / "site.json"
    bad.write_text('{"version": 1, "binds": [], "bindz": []}\n')
    rc, lines, _ = doctor(user, "--site-config", str(bad))
    assert rc == 1
    sc = lines["site-config"]
    assert sc["status"] == "FAIL"
    assert sc["detail"] == (f"{bad}: unknown key 'bindz' (site.json is written by "
                            "'hpcimage generate': run this hpcimage's)")
    bad.write_text('{"version": 1, "lmod": {"modulepath": [], "prefx": "/x"}}\n')
    rc, lines, _ = doctor(user, "--site-config", str(bad))
    assert rc == 1 and lines["site-config"]["status"] == "FAIL"
    assert "unknown key 'lmod.prefx'" in lines["site-config"]["detail"]


def test_site_config_none_warns(user):
    rc, lines, _ = doctor(user)
    assert rc == 0
    assert lines["site-config"]["status"] == "WARN"
    assert lines["site-config"]["detail"] == ("no site.json: HPCIMAGE_SITE_CONFIG unset and "
                                              "no image-exec on PATH")


def test_site_config_stale_warns(user, rendered):
    site, wrappers = rendered
    site.write_text(site.read_text().replace("binds: []", "binds: [/srv]"))
    rc, lines, _ = doctor(user, "--site", str(site),
                          env={"PATH": f"{wrappers}:/usr/bin:/bin"})
    assert rc == 0
    sc = lines["site-config"]
    assert sc["status"] == "WARN"
    assert sc["detail"] == (f"{wrappers}/site.json (beside {wrappers}/image-exec): stale: "
                            f"differs from what {site} renders (binds)")
    assert sc["fix"].startswith(f"hpcimage generate --site {site}")


def test_site_option_finds_the_sites_site_json(user, rendered):
    """No module loaded: --site checks the site.json its wrappers directory holds."""
    site, wrappers = rendered
    rc, lines, _ = doctor(user, "--site", str(site))
    assert rc == 0
    assert lines["site-config"] == {
        "name": "site-config", "status": "OK", "fix": None,
        "detail": f"{wrappers}/site.json (the wrappers directory of --site): "
                  f"current with {site}"}
    (wrappers / "site.json").unlink()
    rc, lines, _ = doctor(user, "--site", str(site))
    assert rc == 1
    assert lines["site-config"]["status"] == "FAIL"
    assert lines["site-config"]["detail"] == (f"{wrappers}/site.json (the wrappers "
                                              "directory of --site): missing")


def test_site_config_other_format_version_warns(user, rendered):
    _site, wrappers = rendered
    sj = wrappers / "site.json"
    sj.write_text(sj.read_text().replace('"version": 1', '"version": 7'))
    rc, lines, _ = doctor(user, "--site-config", str(sj))
    assert rc == 0
    assert lines["site-config"]["status"] == "WARN"
    assert lines["site-config"]["detail"].endswith("format version 7, this hpcimage writes 1")


def test_bad_site_yaml_is_one_line_exit_2(user, rendered):
    site, wrappers = rendered
    site.write_text("store: [\n")
    r = user.run(cli_argv("doctor", "--site", str(site), "--site-config",
                          str(wrappers / "site.json")), timeout=60)
    assert r.returncode == 2
    assert r.stdout == ""
    assert r.stderr.startswith(f"hpcimage: error: {site}")
    assert len(r.stderr.splitlines()) == 1


# ------------------------------------------------------------ the build's ids

def test_no_subordinate_ids_warns(user):
    rc, lines, err = doctor(user, setup='f=$(mktemp); mount --bind "$f" /etc/subuid')
    assert rc == 0, (lines, err)
    sub = lines["subordinate-ids"]
    assert sub["status"] == "WARN"
    assert sub["detail"].startswith(f"no subordinate ids for {user.name} in /etc/subuid and "
                                    "/etc/subgid: builds map only your own id")
    assert sub["fix"] == (f"add ranges: usermod --add-subuids 100000-165535 --add-subgids "
                          f"100000-165535 {user.name} (or the site's ranges, unique per user)")


def test_newuidmap_without_setuid_warns(user, userdir):
    bindir = userdir / "bin"
    bindir.mkdir()
    for t in ("newuidmap", "newgidmap"):
        shutil.copy(f"/usr/bin/{t}", bindir / t)
        (bindir / t).chmod(0o755)                      # no setuid bit
    subprocess.run(["chmod", "-R", "a+rX", str(bindir)], check=True)
    rc, lines, _ = doctor(user, env={"PATH": f"{bindir}:/usr/bin:/bin"})
    assert rc == 0
    sub = lines["subordinate-ids"]
    assert sub["status"] == "WARN"
    assert sub["detail"] == (f"{bindir}/newuidmap, {bindir}/newgidmap: neither setuid root "
                             "nor with file capabilities: builds with subordinate ids fail")
    assert sub["fix"].startswith(f"chmod u+s {bindir}/newuidmap {bindir}/newgidmap")


# ------------------------------------------------- tools, Lmod, the MPI joiner

def test_fuse_tools_found_on_path(user, userdir):
    bindir = userdir / "bin"
    bindir.mkdir()
    for t in TOOLS:
        (bindir / t).write_text("#!/bin/sh\n")
        (bindir / t).chmod(0o755)
    rc, lines, _ = doctor(user, env={"PATH": f"{bindir}:/usr/bin:/bin"})
    assert rc == 0
    for t in TOOLS:
        assert lines[t] == {"name": t, "status": "OK", "detail": str(bindir / t), "fix": None}


@pytest.mark.parametrize("tool", TOOLS)
def test_fuse_tool_missing_warns(user, tool):
    setup = ":"
    if _tool_installed(tool):
        setup = "; ".join(f"[ ! -e {d}/{tool} ] || mount --bind /dev/null {d}/{tool}"
                          for d in TOOL_DIRS)
    rc, lines, err = doctor(user, setup=setup)
    assert rc == 0, (lines, err)
    assert lines[tool]["status"] == "WARN"
    assert lines[tool]["detail"].startswith("not found: ") and " need" in lines[tool]["detail"]
    assert lines[tool]["fix"].startswith("install ")


def test_no_lmod_warns(user):
    rc, lines, err = doctor(user, setup="mount -t tmpfs tmpfs /usr/share/lmod")
    assert rc == 0, (lines, err)
    assert lines["lmod"]["status"] == "WARN"
    assert lines["lmod"]["detail"].startswith("no Lmod (no libexec/lmod in "
                                              "/usr/share/lmod/lmod, ")
    assert lines["lmod"]["fix"].startswith("install Lmod")


def test_lmod_from_lmod_cmd(user):
    rc, lines, _ = doctor(user, env={"LMOD_CMD": "/usr/share/lmod/lmod/libexec/lmod"})
    assert rc == 0
    assert lines["lmod"]["status"] == "OK"
    assert lines["lmod"]["detail"].endswith(", from $LMOD_CMD/../..")


def test_joiner_not_built_warns(user):
    if not os.path.exists(JOINER):
        pytest.skip("the joiner is not built here")
    rc, lines, err = doctor(user, setup=f"mount --bind /dev/null {JOINER}")
    assert rc == 0, (lines, err)
    j = lines["mpi-joiner"]
    assert j["status"] == "WARN"
    assert j["detail"] == (f"{JOINER}: not built: every image-mpi rank starts a Python "
                           "runtime (slower launch)")


def test_joiner_out_of_the_wrappers_reach_warns(user):
    if not os.access(JOINER, os.X_OK):
        pytest.skip("the joiner is not built here")
    rc, lines, _ = doctor(user, env={"HPCIMAGE_PYTHON": "/usr/bin/python3"})
    assert rc == 0
    j = lines["mpi-joiner"]
    assert j["status"] == "WARN"
    assert j["detail"] == (f"{JOINER} is built, but the image-mpi wrappers look for it as "
                           "/usr/lib/python3*/site-packages/hpcimage/runtime/mpi/hpcimage-join "
                           "and do not find it there: every rank starts a Python runtime")
