"""Helpers for tests that drive the real module systems and `hpcimage generate`.

    from modtools import (REPO, generate, lmod, envmodules, module_script,
                          requires_lmod, requires_envmodules, as_user, world_tmp)

    res = module_script("lmod", "module load Demo/1.0", modulepath=[mf])
    res.rc, res.out, res.err, res.env["HPCIMAGE_IMAGE"]

`system` is one of
    "lmod"        bash with Lmod's init (/usr/share/lmod/lmod/init/bash) sourced
    "lmod-cmd"    bash with module() { eval "$($LMOD_CMD bash "$@")"; } only
    "lmod-login"  `bash -lc`: Lmod from /etc/profile.d/lmod.sh, as a user logs in
    "em"          bash with module() { eval "$(tclsh modulecmd.tcl bash "$@")"; }:
                  Environment Modules 5 unpacked in /opt/hpcimage/envmodules
Every run starts from a clean environment (no inherited module state), with a
fresh HOME; `user=` runs it as that user (root only), e.g. as_user().
"""
import os
import pwd
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# Test the checkout, not whatever copy is installed (same as `pythonpath = .`).
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

VENV_PYTHON = "/opt/hpcimage/venv/bin/python3"
LMOD_CMD = "/usr/share/lmod/lmod/libexec/lmod"
LMOD_INIT = "/usr/share/lmod/lmod/init/bash"
LMOD_PROFILE = "/etc/profile.d/lmod.sh"
EM_ROOT = "/opt/hpcimage/envmodules"
EM_CMD = f"{EM_ROOT}/usr/lib/x86_64-linux-gnu/modulecmd.tcl"
EM_HOME = f"{EM_ROOT}/usr/share/modules"
TCLSH = shutil.which("tclsh") or "/usr/bin/tclsh"
LUAC = shutil.which("luac5.3") or shutil.which("luac")
TEST_USER = os.environ.get("HPCIMAGE_TEST_USER", "hpcuser")

ENV_MARK = "\n@@HPCIMAGE-TEST-ENV@@\n"


def have_lmod():
    return os.access(LMOD_CMD, os.X_OK) and os.path.isfile(LMOD_INIT)


def have_envmodules():
    return os.path.isfile(EM_CMD) and os.access(TCLSH, os.X_OK)


def have_user(name=TEST_USER):
    try:
        pwd.getpwnam(name)
    except KeyError:
        return False
    return os.geteuid() == 0


requires_lmod = pytest.mark.skipif(not have_lmod(), reason=f"Lmod not installed ({LMOD_CMD})")
requires_envmodules = pytest.mark.skipif(
    not have_envmodules(), reason=f"Environment Modules not unpacked ({EM_CMD}); run scripts/setup.sh")
requires_user = pytest.mark.skipif(
    not have_user(), reason=f"needs root and the test user {TEST_USER} (scripts/setup.sh)")


# --------------------------------------------------------------------------
# hpcimage generate
# --------------------------------------------------------------------------

def hpcimage_cmd():
    """The command line of the checkout's CLI."""
    return [sys.executable, "-m", "hpcimage.cli"]


def cli_env(extra=None):
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.update(extra or {})
    return env


def generate(*args, cwd=None, check=False, timeout=60):
    """Run `hpcimage generate ARGS` -> CompletedProcess (text, captured)."""
    return subprocess.run(hpcimage_cmd() + ["generate", *map(str, args)], cwd=cwd,
                          env=cli_env(), capture_output=True, text=True,
                          timeout=timeout, check=check)


def write_site(directory, text):
    """Write `text` as directory/site.yaml; returns its Path."""
    p = Path(directory) / "site.yaml"
    p.write_text(text)
    return p


def snapshot(root):
    """{relative path: (bytes, mode, mtime_ns)} of every file below root."""
    out = {}
    root = Path(root)
    if not root.exists():
        return out
    for p in sorted(root.rglob("*")):
        if p.is_file() or p.is_symlink():
            st = p.lstat()
            out[str(p.relative_to(root))] = (p.read_bytes() if p.is_file() else b"",
                                             st.st_mode & 0o7777, st.st_mtime_ns)
    return out


# --------------------------------------------------------------------------
# Module systems
# --------------------------------------------------------------------------

@dataclass
class Result:
    rc: int
    out: str        # stdout before the environment dump
    err: str
    env: dict       # the environment at the end of the script


def clean_env(home, user="root", extra=None):
    env = {
        "PATH": "/usr/local/bin:/usr/bin:/bin",
        "HOME": str(home),
        "USER": user,
        "LOGNAME": user,
        "LANG": "C.UTF-8",
        "TERM": "dumb",
        "LMOD_PAGER": "none",
        "MODULES_PAGER": "",
        "LMOD_REDIRECT": "no",
    }
    env.update(extra or {})
    return env


def _prelude(system):
    if system == "lmod":
        return f". {LMOD_INIT}\n"
    if system == "lmod-cmd":
        return f'module() {{ eval "$({LMOD_CMD} bash "$@")"; }}\n'
    if system == "lmod-login":
        return ""                       # /etc/profile.d/lmod.sh does it
    if system == "em":
        return (f"MODULESHOME={EM_HOME}; export MODULESHOME\n"
                f'module() {{ eval "$({TCLSH} {EM_CMD} bash "$@")"; }}\n')
    raise ValueError(f"unknown module system {system!r}")


def module_script(system, script, modulepath=(), user=None, env=None, cwd=None, timeout=60):
    """Run `script` in bash with `system`'s `module` command and `modulepath`
    in use; returns Result with the final environment."""
    if user is not None:
        pw = pwd.getpwnam(user)
        home = pw.pw_dir
        uname = user
    else:
        home = tempfile.mkdtemp(prefix="hpcimage-home-")
        uname = "root" if os.geteuid() == 0 else pwd.getpwuid(os.geteuid()).pw_name
    try:
        body = _prelude(system)
        for d in modulepath:
            body += f"module use {_sh(str(d))}\n"
        body += script + f"\nprintf '%s' '{ENV_MARK}'\nenv -0\n"
        argv = ["bash", "-lc", body] if system == "lmod-login" else ["bash", "-c", body]
        kwargs = {}
        if user is not None:
            from conftest import assert_user_can_reach
            assert_user_can_reach(argv, cwd, env)
            kwargs = dict(user=pw.pw_uid, group=pw.pw_gid, extra_groups=[])
        p = subprocess.run(argv, env=clean_env(home, uname, env), cwd=cwd or home,
                           capture_output=True, text=True, timeout=timeout, **kwargs)
    finally:
        if user is None:
            shutil.rmtree(home, ignore_errors=True)
    out, _, dump = p.stdout.rpartition(ENV_MARK)
    if not _:
        out, dump = p.stdout, ""
    envd = {}
    for item in dump.split("\0"):
        if "=" in item:
            k, v = item.split("=", 1)
            envd[k] = v
    return Result(p.returncode, out, p.stderr, envd)


def lmod(script, modulepath=(), **kw):
    return module_script("lmod", script, modulepath, **kw)


def envmodules(script, modulepath=(), **kw):
    return module_script("em", script, modulepath, **kw)


def load(system, modulepath, *modules, **kw):
    """`module load M` for each of modules, then `module -t list`."""
    script = "".join(f"module load {_sh(m)}\n" for m in modules) + "module -t list 2>&1\n"
    return module_script(system, script, modulepath, **kw)


def as_user():
    return TEST_USER


def _sh(s):
    return "'" + s.replace("'", "'\\''") + "'"


@pytest.fixture
def world_tmp():
    """A temporary directory every user can read (for runs as the test user)."""
    d = tempfile.mkdtemp(prefix="hpcimage-test-")
    os.chmod(d, 0o755)
    yield Path(d)
    shutil.rmtree(d, ignore_errors=True)
