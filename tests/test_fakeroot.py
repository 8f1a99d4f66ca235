"""--fakeroot and --writable (issue 16), as the test user: root inside through
/etc/subuid and /etc/subgid (newuidmap), a single id where the user has no ranges,
HOME=/root; a sandbox directory the user owns written in place; the refusals."""
import os
import shutil
import subprocess

import pytest

from conftest import PY, cli_argv, runtime_argv

SUBUID = 100000         # scripts/setup.sh gives the test user 100000:65536


def hexec(user, *args, env=None, cwd=None, timeout=120):
    return user.run(runtime_argv("exec", *args), env=env, cwd=cwd, timeout=timeout)


def one_line_error(r, status, text):
    assert r.returncode == status, (r.stdout, r.stderr)
    assert r.stderr.count("\n") == 1 and text in r.stderr, r.stderr


# A private mount namespace (root), /etc/subuid and /etc/subgid covered by an empty
# file, then the command as the test user: a user without ranges, the machine untouched.
NO_RANGES = r"""
import os, subprocess, sys
from hpcimage.linux import syscalls as sc
uid, gid, argv = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3:]
sc.unshare(sc.CLONE_NEWNS)
sc.mount(None, "/", None, sc.MS_REC | sc.MS_PRIVATE)
for f in ("/etc/subuid", "/etc/subgid"):
    open("/tmp/hpcimage-empty-subid", "w").close()
    sc.mount("/tmp/hpcimage-empty-subid", f, None, sc.MS_BIND)
os.setgroups([])
os.setgid(gid)
os.setuid(uid)
os.execv(argv[0], argv)
"""


def without_ranges(user, argv, cwd):
    return subprocess.run([PY, "-c", NO_RANGES, str(user.uid), str(user.gid), *argv],
                          env=user.env(), cwd=cwd, capture_output=True, text=True,
                          timeout=120)


@pytest.fixture
def sandbox(user, userdir, demo_dir):
    """A copy of the Demo image that the test user owns."""
    d = userdir / "sandbox"
    shutil.copytree(demo_dir, d, symlinks=True)
    subprocess.run(["chown", "-R", f"{user.uid}:{user.gid}", str(d)], check=True)
    return d


def test_fakeroot_is_root_inside_mapped_through_subuid(user, userdir, image):
    r = hexec(user, "--fakeroot", "-B", f"{userdir}:/data", image, "sh", "-c",
              'id -u; id -g; echo "$HOME"; cat /proc/self/uid_map; '
              'touch /root/made-by-root /data/mine; chown 1:2 /data/mine && echo chowned; '
              'ls -ln /data/mine', cwd=str(userdir))
    assert r.returncode == 0, r.stderr
    lines = r.stdout.split("\n")
    assert lines[:3] == ["0", "0", "/root"], r.stdout
    assert lines[3].split() == ["0", str(user.uid), "1"]
    assert lines[4].split() == ["1", str(SUBUID), "65536"]
    assert "chowned" in lines
    assert r.stderr == ""
    # outside: root's files are the user's, id 1 is the first subordinate id
    made = os.path.join(user.home, "made-by-root")
    try:
        st = os.stat(made)
        assert (st.st_uid, st.st_gid) == (user.uid, user.gid)
    finally:
        os.unlink(made)
    st = os.stat(userdir / "mine")
    assert (st.st_uid, st.st_gid) == (SUBUID, SUBUID + 1)


def test_fakeroot_short_form_and_variable(user, demo_dir, userdir):
    for opts, env in ((("-f",), None), ((), {"APPTAINER_FAKEROOT": "1"}),
                      ((), {"SINGULARITY_FAKEROOT": "true"})):
        r = hexec(user, *opts, str(demo_dir), "id", "-u", env=env, cwd=str(userdir))
        assert (r.returncode, r.stdout, r.stderr) == (0, "0\n", ""), (opts, env, r.stderr)


def test_fakeroot_without_subordinate_ids_maps_one_id_with_a_warning(user, demo_dir,
                                                                     userdir):
    r = without_ranges(user, runtime_argv("exec", "--fakeroot", str(demo_dir), "sh", "-c",
                                          "id -u; cat /proc/self/uid_map; "
                                          "touch /root/single-id"), str(userdir))
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0] == "0" and lines[1].split() == ["0", str(user.uid), "1"]
    assert len(lines) == 2
    assert r.stderr == (f"hpcimage: warning: --fakeroot: no subordinate ids for {user.name} "
                        "in /etc/subuid and /etc/subgid: only your own ids are mapped (you "
                        "are root inside; files of other owners show as nobody, chown to "
                        "them fails)\n")
    path = os.path.join(user.home, "single-id")
    assert os.stat(path).st_uid == user.uid
    os.unlink(path)


def test_fakeroot_home_options(user, demo_dir, userdir):
    r = hexec(user, "--fakeroot", "--no-home", str(demo_dir), "sh", "-c",
              'echo "$HOME"; ls /root | wc -l', cwd=str(userdir))
    assert r.returncode == 0 and r.stdout.split() == ["/root", "0"], r.stderr
    r = hexec(user, "--fakeroot", "-H", f"{userdir}:/hh", str(demo_dir), "sh", "-c",
              'echo "$HOME"; id -u', cwd="/")
    assert r.returncode == 0 and r.stdout.split() == ["/hh", "0"], r.stderr


def test_fakeroot_dry_run_names_the_map(user, demo_dir):
    r = hexec(user, "--fakeroot", "--dry-run", str(demo_dir), "true", cwd="/")
    assert r.returncode == 0, r.stderr
    assert (f"userns {user.uid} {user.gid} fakeroot  # subordinate ids: uid {user.uid} -> 0, "
            f"{SUBUID}.. -> 1..65536; gid {user.gid} -> 0, {SUBUID}.. -> 1..65536"
            in r.stdout.splitlines())
    assert f"bind {user.home} -> /root  # --fakeroot: your home at /root" in r.stdout


def test_build_accepts_fakeroot(user):
    r = user.run(cli_argv("build", "--help"))
    assert r.returncode == 0 and "--fakeroot" in r.stdout


# ---------------------------------------------------------------- --writable

def test_writable_sandbox_is_written_in_place(user, sandbox):
    r = hexec(user, "--writable", str(sandbox), "sh", "-c",
              "echo new > /opt/new-file && rm /bin/true && echo ok", cwd="/")
    assert (r.returncode, r.stdout, r.stderr) == (0, "ok\n", ""), r.stderr
    assert (sandbox / "opt" / "new-file").read_text() == "new\n"
    assert not (sandbox / "bin" / "true").exists()
    # without --writable the same sandbox is read-only
    r = hexec(user, str(sandbox), "sh", "-c", "echo x > /opt/other", cwd="/")
    assert r.returncode != 0 and "Read-only file system" in r.stderr
    assert not (sandbox / "opt" / "other").exists()


def test_writable_with_fakeroot_files_are_the_users(user, sandbox):
    r = hexec(user, "--fakeroot", "--writable", str(sandbox), "sh", "-c",
              "mkdir /opt/x && chown 5:5 /opt/x && ls -ldn /opt", cwd="/")
    assert r.returncode == 0, r.stderr
    assert r.stdout.split()[2:4] == ["0", "0"]        # the user's own: root inside
    st = os.stat(sandbox / "opt" / "x")
    assert (st.st_uid, st.st_gid) == (SUBUID + 4, SUBUID + 4)
    subprocess.run(["rm", "-rf", str(sandbox / "opt" / "x")], check=True)


APT_LIKE = ("mkdir /etc/foo.d && echo a > /etc/foo.d/c && mkdir -p /var/lib/x && "
            "echo v > /var/lib/x/f && echo r > /root/r")


@pytest.mark.parametrize("fakeroot", [False, True])
def test_writable_sandbox_missing_mount_points_never_shadow_it(user, sandbox, fakeroot):
    """The sandbox lacks /etc/hosts and /var (bind targets): they are made in the
    sandbox itself, and what the command writes in /etc, /var and /root stays (a
    skeleton over the image lost it)."""
    assert not (sandbox / "etc" / "hosts").exists() and not (sandbox / "var").exists()
    args = ["--fakeroot", "--no-home"] if fakeroot else []
    r = hexec(user, *args, "-w", str(sandbox), "sh", "-c", APT_LIKE, cwd="/")
    assert (r.returncode, r.stderr) == (0, ""), r.stderr
    assert (sandbox / "etc" / "foo.d" / "c").read_text() == "a\n"
    assert (sandbox / "var" / "lib" / "x" / "f").read_text() == "v\n"
    assert (sandbox / "root" / "r").read_text() == "r\n"
    hosts = (sandbox / "etc" / "hosts").stat()          # the mount point, left there
    assert hosts.st_size == 0 and hosts.st_mode & 0o777 == 0o644
    r = hexec(user, str(sandbox), "cat", "/etc/foo.d/c", "/var/lib/x/f", cwd="/")
    assert (r.returncode, r.stdout) == (0, "a\nv\n"), r.stderr


def test_writable_refusals(user, demo_dir, demo_sqfs, demo_sif):
    one_line_error(hexec(user, "--writable", str(demo_sqfs), "true", cwd="/"), 2,
                   f"hpcimage: error: --writable: {demo_sqfs} is a SquashFS image (read-only)")
    one_line_error(hexec(user, "-w", str(demo_sif), "true", cwd="/"), 2,
                   f"hpcimage: error: --writable: {demo_sif} is a SIF image: writing it "
                   "needs an overlay partition")
    one_line_error(hexec(user, "--writable", str(demo_dir), "true", cwd="/"), 2,
                   f"hpcimage: error: --writable: {demo_dir}: you cannot write this "
                   "sandbox directory")
    one_line_error(hexec(user, str(demo_dir), "true", env={"APPTAINER_WRITABLE": "1"},
                         cwd="/"), 2, "you cannot write this sandbox directory")


# ------------------------------------------------------- apt-get as fakeroot

@pytest.mark.network
def test_fakeroot_writable_apt_get_install(user, userdir, debian_dir):
    """--fakeroot --writable on the user's copy of the Debian image: apt-get install
    works (apt's _apt sandbox user is a subordinate id) and stays."""
    d = userdir / "debian"
    subprocess.run(["cp", "-a", str(debian_dir), str(d)], check=True)
    subprocess.run(["chown", "-R", f"{user.uid}:{user.gid}", str(d)], check=True)
    r = hexec(user, "--fakeroot", "--writable", str(d), "sh", "-c",
              "apt-get -q update >/dev/null && apt-get -q install -y --no-install-recommends "
              "hello >/dev/null && hello", cwd="/", timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.strip().endswith("Hello, world!")
    r = hexec(user, str(d), "hello", cwd="/")
    assert (r.returncode, r.stdout) == (0, "Hello, world!\n"), r.stderr
    subprocess.run(["rm", "-rf", str(d)], check=True)


@pytest.mark.network
def test_fakeroot_overlay_apt_get_install_persists(user, userdir, debian_sqfs):
    img = userdir / "my.img"
    r = user.run(cli_argv("overlay", "create", "--fakeroot", "--size", "256", str(img)))
    assert r.returncode == 0, r.stderr
    r = hexec(user, "--fakeroot", "--overlay", str(img), str(debian_sqfs), "sh", "-c",
              "apt-get -q update >/dev/null && apt-get -q install -y --no-install-recommends "
              "hello >/dev/null", cwd="/", timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    r = hexec(user, "--overlay", f"{img}:ro", str(debian_sqfs), "hello", cwd="/")
    assert (r.returncode, r.stdout) == (0, "Hello, world!\n"), r.stderr
