"""`hpcimage pull` and `hpcimage exec|run|shell docker://REF` as the non-root test user,
against a registry on loopback (tests/registry.py): docker:// to SIF, Apptainer's file
names, --force, --arch, progress on a terminal only, token authentication, oras://
round trip, the conversion cache (used again without the registry), and the errors
(one line, exit 2 for bad input, 1 for a failed operation)."""
import os
import subprocess
from pathlib import Path

import pytest

from conftest import PY, cli_argv, on_terminal
import registry as reg

MSG = b"hello from the registry\n"


def hrun(user, *args, env=None, cwd=None, **kw):
    return user.run(cli_argv(*args), env=env, cwd=str(cwd) if cwd else None, **kw)


def one_line(r):
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("hpcimage: error: "), r.stderr
    return lines[0]


@pytest.fixture
def registry(tmp_path):
    why = reg.Registry.unavailable()
    if why:
        pytest.skip(why)
    r = reg.Registry(str(tmp_path))
    try:
        r.start()
    except RuntimeError as e:
        pytest.skip(str(e))
    yield r
    r.stop()


def tool_layers(bare_dir, msg=MSG):
    return [reg.dir_layer(bare_dir),
            reg.tar_layer([("etc", "dir", None, 0o755),
                           ("etc/msg", "file", msg, 0o644)])]


CONFIG = dict(env=["PATH=/usr/bin:/bin", "GREETING=hi there"],
              cmd=["/bin/sh", "-c", 'echo "cmd: $GREETING"'],
              labels={"org.opencontainers.image.version": "1.0"})


def push_tool(registry, bare_dir, repo="hpc/tool", tag="1.0", msg=MSG):
    return registry.push_image(repo, tag, tool_layers(bare_dir, msg),
                               reg.image_config(**CONFIG))


def env_for(userdir, **more):
    return {"HPCIMAGE_CACHEDIR": str(userdir / "cache"), **more}


def leftovers(d):
    return sorted(p.name for p in Path(d).iterdir() if p.name.startswith("."))


# ----------------------------------------------------------------- docker://

def test_pull_docker_to_sif_then_exec(user, userdir, bare_dir, registry):
    push_tool(registry, bare_dir)
    uri = f"docker://{registry.host}/hpc/tool:1.0"
    r = hrun(user, "pull", uri, cwd=userdir, env=env_for(userdir))
    assert r.returncode == 0, r.stderr
    assert r.stderr == "" and r.stdout == ""            # not a terminal: quiet
    sif = userdir / "tool_1.0.sif"                      # Apptainer's NAME_TAG.sif
    assert sif.read_bytes()[32:42] == b"SIF_MAGIC\0"
    assert sif.stat().st_uid == user.uid and sif.stat().st_mode & 0o111
    r = hrun(user, "exec", str(sif), "cat", "/etc/msg")
    assert r.returncode == 0 and r.stdout == MSG.decode(), r.stderr
    r = hrun(user, "run", str(sif))
    assert r.stdout == "cmd: hi there\n", r.stderr
    # the definition the SIF records names the image it came from, by digest
    r = hrun(user, "inspect", str(sif))
    assert f"{registry.host}/hpc/tool@sha256:" in r.stdout, r.stdout
    # OUTPUT given; no tag means latest
    registry.push_image("hpc/plain", "latest", tool_layers(bare_dir), reg.image_config())
    r = hrun(user, "pull", "mine.sif", f"docker://{registry.host}/hpc/plain",
             cwd=userdir, env=env_for(userdir))
    assert r.returncode == 0, r.stderr
    assert (userdir / "mine.sif").is_file() and not (userdir / "plain_latest.sif").exists()
    r = hrun(user, "pull", f"docker://{registry.host}/hpc/plain", cwd=userdir,
             env=env_for(userdir))
    assert r.returncode == 0 and (userdir / "plain_latest.sif").is_file(), r.stderr
    # Apptainer's --dir and --name
    sub = userdir / "sub"
    sub.mkdir()
    os.chown(sub, user.uid, user.gid)
    r = hrun(user, "pull", "--dir", "sub", f"docker://{registry.host}/hpc/plain",
             cwd=userdir, env=env_for(userdir))
    assert r.returncode == 0 and (sub / "plain_latest.sif").is_file(), r.stderr
    r = hrun(user, "pull", "--dir", "sub", "--name", "n.sif",
             f"docker://{registry.host}/hpc/plain", cwd=userdir, env=env_for(userdir))
    assert r.returncode == 0 and (sub / "n.sif").is_file(), r.stderr
    # and their variables
    r = hrun(user, "pull", f"docker://{registry.host}/hpc/plain", cwd=userdir,
             env=env_for(userdir, APPTAINER_PULLDIR="sub", APPTAINER_PULL_NAME="v.sif"))
    assert r.returncode == 0 and (sub / "v.sif").is_file(), r.stderr
    assert leftovers(userdir) == []


def test_pull_refuses_to_overwrite(user, userdir, bare_dir, registry):
    push_tool(registry, bare_dir)
    uri = f"docker://{registry.host}/hpc/tool:1.0"
    out = userdir / "t.sif"
    out.write_bytes(b"precious\n")
    os.chown(out, user.uid, user.gid)
    r = hrun(user, "pull", str(out), uri, cwd=userdir, env=env_for(userdir))
    assert r.returncode == 2
    assert "already exists" in one_line(r) and "--force" in r.stderr
    assert out.read_bytes() == b"precious\n"
    assert not (userdir / "cache").exists()             # refused before any download
    r = hrun(user, "pull", "--force", str(out), uri, cwd=userdir, env=env_for(userdir))
    assert r.returncode == 0, r.stderr
    assert hrun(user, "exec", str(out), "cat", "/etc/msg").stdout == MSG.decode()
    r = hrun(user, "pull", "-F", str(out), uri, cwd=userdir, env=env_for(userdir))
    assert r.returncode == 0, r.stderr
    r = hrun(user, "pull", str(out), uri, cwd=userdir,
             env=env_for(userdir, SINGULARITY_FORCE="true"))
    assert r.returncode == 0, r.stderr
    assert leftovers(userdir) == []
    # a directory is never replaced, --force or not
    r = hrun(user, "pull", "--force", str(userdir / "cache"), uri, cwd=userdir,
             env=env_for(userdir))
    assert r.returncode == 2 and "is a directory" in one_line(r)
    # a directory the user cannot write: a failed operation, nothing left
    locked = userdir / "locked"
    locked.mkdir()
    r = hrun(user, "pull", str(locked / "t.sif"), uri, cwd=userdir, env=env_for(userdir))
    assert r.returncode == 1 and "cannot write" in one_line(r)
    assert list(locked.iterdir()) == []


def _on_terminal(user, argv, env, cwd, timeout=300):
    """Run argv with stderr on a pseudo-terminal; (status, what the terminal got)."""
    return on_terminal(user, argv, env, cwd, timeout=timeout)


def test_pull_progress_on_a_terminal_and_token_auth(user, userdir, bare_dir, registry):
    push_tool(registry, bare_dir)
    front = reg.TokenFront(registry.url("")).start()
    try:
        rc, tty = _on_terminal(user, cli_argv("pull", f"docker://{front.host}/hpc/tool:1.0"),
                               env_for(userdir), userdir)
        assert front.token_requests, "no token asked for"
    finally:
        front.stop()
    assert rc == 0, tty
    assert "copying blob" in tty and "\r" in tty and "100%" in tty, tty
    assert "tool_1.0.sif" in tty
    sif = userdir / "tool_1.0.sif"
    assert hrun(user, "exec", str(sif), "cat", "/etc/msg").stdout == MSG.decode()


def test_pull_arch(user, userdir, bare_dir, registry):
    from hpcimage.image.arch import host
    foreign = "arm64" if host() != "arm64" else "amd64"
    registry.push_index("hpc/multi", "1.0", [
        (foreign, tool_layers(bare_dir, b"foreign\n"), reg.image_config(arch=foreign)),
        (host(), tool_layers(bare_dir, b"native\n"), reg.image_config(arch=host()))])
    uri = f"docker://{registry.host}/hpc/multi:1.0"
    r = hrun(user, "pull", "native.sif", uri, cwd=userdir, env=env_for(userdir))
    assert r.returncode == 0, r.stderr
    assert hrun(user, "exec", str(userdir / "native.sif"), "cat", "/etc/msg").stdout == "native\n"
    r = hrun(user, "pull", "--arch", foreign, "foreign.sif", uri, cwd=userdir,
             env=env_for(userdir))
    assert r.returncode == 0, r.stderr
    r = hrun(user, "sif", "header", str(userdir / "foreign.sif"))
    assert f"Primary Architecture: {foreign}" in " ".join(r.stdout.split()), r.stdout
    r = hrun(user, "pull", "--arch", "s390x", "none.sif", uri, cwd=userdir,
             env=env_for(userdir))
    assert r.returncode == 1 and "no image for linux/s390x" in one_line(r)
    assert not (userdir / "none.sif").exists()


# ----------------------------------------------------------------- oras://

def test_oras_round_trip(user, userdir, demo_sif, registry):
    data = Path(demo_sif).read_bytes()
    registry.push_sif("hpc/demo-sif", "1.0", data)
    uri = f"oras://{registry.host}/hpc/demo-sif:1.0"
    r = hrun(user, "pull", uri, cwd=userdir, env=env_for(userdir))
    assert r.returncode == 0, r.stderr
    out = userdir / "demo-sif_1.0.sif"
    assert out.read_bytes() == data                     # the very SIF that was pushed
    r = hrun(user, "exec", uri, "cat", "/etc/os-release", env=env_for(userdir))
    want = hrun(user, "exec", demo_sif, "cat", "/etc/os-release")
    assert r.returncode == 0 and r.stdout == want.stdout, r.stderr
    # the registry gone: the cached SIF, with a warning
    registry.stop()
    r = hrun(user, "exec", uri, "cat", "/etc/os-release", env=env_for(userdir))
    assert r.returncode == 0 and r.stdout == want.stdout, r.stderr
    assert "warning" in r.stderr and "cannot reach registry" in r.stderr
    registry.start()
    # an ORAS SIF pulled as a container image: the right transport named
    r = hrun(user, "pull", "x.sif", f"docker://{registry.host}/hpc/demo-sif:1.0",
             cwd=userdir, env=env_for(userdir))
    assert r.returncode == 2 and f"use oras://{registry.host}/hpc/demo-sif:1.0" in one_line(r)
    assert not (userdir / "x.sif").exists()
    # an image that is not an ORAS SIF, pulled as one
    registry.push_image("hpc/notsif", "1.0", [reg.tar_layer([("x", "file", b"x", 0o644)])],
                        reg.image_config())
    r = hrun(user, "pull", f"oras://{registry.host}/hpc/notsif:1.0", cwd=userdir,
             env=env_for(userdir))
    assert r.returncode == 1 and "no SIF layer" in one_line(r)
    assert not (userdir / "notsif_1.0.sif").exists()
    # a SIF layer that holds no SIF
    registry.push_sif("hpc/fake", "1.0", b"not a SIF at all\n" * 10)
    r = hrun(user, "pull", f"oras://{registry.host}/hpc/fake:1.0", cwd=userdir,
             env=env_for(userdir))
    assert r.returncode == 1 and "is not a SIF file" in one_line(r)
    assert not (userdir / "fake_1.0.sif").exists()


# ----------------------------------------------------------------- exec docker://

def test_exec_docker_converts_once_into_the_cache(user, userdir, bare_dir, registry):
    dig = push_tool(registry, bare_dir)
    uri = f"docker://{registry.host}/hpc/tool:1.0"
    env = env_for(userdir)
    r = hrun(user, "exec", uri, "cat", "/etc/msg", env=env, cwd=userdir)
    assert r.returncode == 0 and r.stdout == MSG.decode(), r.stderr
    assert r.stderr == ""                               # quiet: not a terminal
    cached = list((userdir / "cache/sif/sha256").glob("*.sif"))
    assert [c.name for c in cached] == [dig.split(":")[1] + ".sif"]
    first = cached[0].stat()
    # a word after the image that looks like a URI is the command's own
    r = hrun(user, "exec", uri, "echo", "docker://not/an/image", env=env)
    assert r.stdout == "docker://not/an/image\n", r.stderr
    r = hrun(user, "run", uri, env=env)
    assert r.stdout == "cmd: hi there\n", r.stderr
    r = hrun(user, "shell", uri, "-c", "cat /etc/msg", env=env)
    assert r.stdout == MSG.decode(), r.stderr
    r = hrun(user, "test", uri, env=env)                # no %test: says so, status 0
    assert r.returncode == 0 and "no test script found" in r.stderr, r.stderr
    assert cached[0].stat().st_mtime_ns == first.st_mtime_ns    # converted once
    # a new image under the same tag: converted again, by its new digest
    dig2 = push_tool(registry, bare_dir, msg=b"second\n")
    r = hrun(user, "exec", uri, "cat", "/etc/msg", env=env)
    assert r.stdout == "second\n", r.stderr
    assert (userdir / "cache/sif/sha256" / (dig2.split(":")[1] + ".sif")).is_file()
    # the registry gone: the image the tag last named, with a warning
    registry.stop()
    r = hrun(user, "exec", uri, "cat", "/etc/msg", env=env)
    assert r.returncode == 0 and r.stdout == "second\n", r.stderr
    assert "warning" in r.stderr and "cannot reach registry" in r.stderr
    # by digest: no registry needed once that manifest is converted
    r = hrun(user, "exec", f"docker://{registry.host}/hpc/tool@{dig}", "cat", "/etc/msg",
             env=env)
    assert r.returncode == 0 and r.stdout == MSG.decode() and r.stderr == "", r.stderr
    # never pulled, registry gone: a failed operation, one line
    r = hrun(user, "exec", f"docker://{registry.host}/hpc/other:1.0", "true", env=env)
    assert r.returncode == 1 and "cannot reach registry" in one_line(r)
    assert "no cached copy" in r.stderr


def test_concurrent_first_runs_convert_once(user, userdir, bare_dir, registry):
    push_tool(registry, bare_dir)
    uri = f"docker://{registry.host}/hpc/tool:1.0"
    procs = [user.popen(cli_argv("exec", uri, "cat", "/etc/msg"), env=env_for(userdir),
                        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(4)]
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0 and out == MSG.decode(), err
    sifs = list((userdir / "cache/sif/sha256").iterdir())
    assert len([s for s in sifs if s.suffix == ".sif"]) == 1
    assert not [s for s in sifs if ".tmp" in s.name]


def test_exec_by_digest_needs_no_registry(user, userdir, bare_dir, registry):
    dig = push_tool(registry, bare_dir)
    uri = f"docker://{registry.host}/hpc/tool@{dig}"
    env = env_for(userdir)
    assert hrun(user, "exec", uri, "cat", "/etc/msg", env=env).stdout == MSG.decode()
    registry.stop()
    r = hrun(user, "exec", uri, "cat", "/etc/msg", env=env)
    assert r.returncode == 0 and r.stdout == MSG.decode() and r.stderr == "", r.stderr


def test_cache_dir_apptainer_cachedir(user, userdir, bare_dir, registry):
    push_tool(registry, bare_dir)
    r = hrun(user, "exec", f"docker://{registry.host}/hpc/tool:1.0", "true",
             env={"APPTAINER_CACHEDIR": str(userdir / "acache")})
    assert r.returncode == 0, r.stderr
    assert list((userdir / "acache/hpcimage/sif/sha256").glob("*.sif"))


# ----------------------------------------------------------------- errors

@pytest.mark.parametrize("args, status, words", [
    (["pull", "library://alice/default/tool:1"], 2, ["library://", "not supported"]),
    (["pull", "shub://vsoch/hello-world"], 2, ["shub://", "not supported"]),
    (["pull", "x.sif", "https://example.org/x.sif"], 2, ["http", "not supported"]),
    (["pull", "ftp://example.org/x"], 2, ["unsupported transport ftp://"]),
    (["pull", "x.sif", "alpine:3"], 2, ["not a registry reference"]),
    (["pull", "docker://"], 2, ["no image named"]),
    (["pull", "oras://hpc/demo:1"], 2, ["name the registry"]),
    (["pull", "docker://127.0.0.1:5000/Bad_Repo:1"], 2, ["bad repository name"]),
    (["pull", "docker://127.0.0.1:5000/repo:bad!tag"], 2, ["bad tag"]),
    (["pull", "a", "b", "docker://x/y"], 2, ["too many arguments"]),
    (["pull", "docker://127.0.0.1:5000/repo@sha256:zz"], 2, ["bad digest"]),
    (["pull", "--arch", "vax", "docker://127.0.0.1:5000/repo:1"], 2, ["--arch vax"]),
    (["pull", "no/such/dir/x.sif", "docker://127.0.0.1:5000/repo:1"], 2, ["does not exist"]),
    (["pull", "--disable-cache", "docker://127.0.0.1:5000/repo:1"], 2,
     ["--disable-cache is an Apptainer option that hpcimage pull does not support"]),
    (["pull", "--library", "https://x", "library://a/b/c"], 2, ["--library is an Apptainer"]),
    (["exec", "library://alice/default/tool:1", "true"], 2, ["library://", "not supported"]),
    (["run", "shub://vsoch/hello-world"], 2, ["shub://", "not supported"]),
    (["exec", "docker://127.0.0.1:5000/Bad_Repo:1", "true"], 2, ["bad repository name"]),
    (["pull", "docker://127.0.0.1:1/hpc/x:1"], 1, ["cannot reach registry 127.0.0.1:1"]),
    (["exec", "docker://127.0.0.1:1/hpc/x:1", "true"], 1, ["cannot reach registry"]),
])
def test_errors_one_line(user, userdir, args, status, words):
    r = hrun(user, *args, cwd=userdir, env=env_for(userdir))
    line = one_line(r)
    assert r.returncode == status, r.stderr
    for w in words:
        assert w in line, line
    assert sorted(p.name for p in userdir.iterdir() if p.name != "cache") == []


def test_failed_conversion_leaves_nothing(user, userdir, registry):
    evil = reg.tar_layer([("bin", "dir", None, 0o755), ("bin/x", "file", b"good\n", 0o644)])
    registry.push_image("hpc/corrupt", "1.0", [evil], reg.image_config())
    path = Path(registry.blob_file(reg.digest(evil)))
    path.write_bytes(path.read_bytes()[:-1] + bytes([path.read_bytes()[-1] ^ 0xFF]))
    for args in (["pull"], ["exec"]):
        r = hrun(user, *args, f"docker://{registry.host}/hpc/corrupt:1.0",
                 *(["true"] if args == ["exec"] else []), cwd=userdir, env=env_for(userdir))
        assert r.returncode == 1 and "digest mismatch" in one_line(r)
    assert sorted(p.name for p in userdir.iterdir()) == ["cache"]
    assert not list((userdir / "cache").glob("sif/sha256/*.sif"))
    assert not [p for p in (userdir / "cache").rglob("*") if ".tmp" in p.name]


def test_missing_image_in_registry(user, userdir, registry):
    r = hrun(user, "pull", f"docker://{registry.host}/hpc/missing:1.0", cwd=userdir,
             env=env_for(userdir))
    assert r.returncode == 1 and "HTTP 404" in one_line(r)
    assert sorted(p.name for p in userdir.iterdir() if p.name != "cache") == []


def test_plain_exec_takes_no_slower_path(user, userdir, demo_sqfs):
    """`hpcimage exec IMAGE` imports what it imported before (no click, no imagebuild),
    also when a word of the command looks like a URI."""
    def imported(*args):
        r = user.run([PY, "-I", "-X", "importtime", "-m", "hpcimage.cli", *args],
                     cwd=str(userdir))
        assert r.returncode == 0, r.stderr
        return {ln.rsplit("|", 1)[1].strip() for ln in r.stderr.splitlines()
                if ln.startswith("import time:") and "|" in ln}
    for args in (["exec", "--dry-run", str(demo_sqfs), "true"],
                 ["exec", "--dry-run", str(demo_sqfs), "echo", "docker://x/y"]):
        mods = imported(*args)
        assert not {m for m in mods if m.startswith(("hpcimage.imagebuild", "click"))}, args
