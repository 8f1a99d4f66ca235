"""scripts/install.sh: a site's install of hpcimage into a prefix (versioned venvs behind
an atomically switched PREFIX/venv link), without the network when the system's packages
are there, and wrappers rendered for that prefix starting containers."""
import os
import re
import shutil
import subprocess
import tempfile
import textwrap
from pathlib import Path

import pytest

from conftest import REPO

INSTALL = REPO / "scripts" / "install.sh"
TESTS = Path("/tmp/hpcimage-tests")


def _checkout(dst):
    """The parts of a checkout install.sh needs, copied (so the test may change them)."""
    for name in ("hpcimage", "templates", "scripts"):
        shutil.copytree(REPO / name, dst / name, symlinks=True,
                        ignore=shutil.ignore_patterns("__pycache__", "hpcimage-join"))
    for name in ("setup.py", "setup.cfg", "pyproject.toml", "README.md"):
        shutil.copy(REPO / name, dst / name)


@pytest.fixture
def top():
    TESTS.mkdir(exist_ok=True)
    TESTS.chmod(0o755)
    d = Path(tempfile.mkdtemp(dir=TESTS, prefix="install-"))
    d.chmod(0o755)
    yield d
    shutil.rmtree(d, ignore_errors=True)


def _install(src, prefix, fakebin, *args):
    env = dict(os.environ, PATH=f"{fakebin}:{os.environ['PATH']}")
    return subprocess.run(["bash", str(src / "scripts" / "install.sh"), *args, str(prefix)],
                          capture_output=True, text=True, env=env, timeout=600)


def test_install_into_a_prefix_and_upgrade_beside_the_old_version(top, user, demo_sqfs):
    src, prefix, fakebin = top / "src", top / "apps" / "hpcimage", top / "fakebin"
    _checkout(src)
    fakebin.mkdir()
    # the packages are all there: install.sh must not reach for apt-get (the network)
    (fakebin / "apt-get").write_text(f"#!/bin/sh\ntouch {top}/apt-get-ran\nexit 1\n")
    (fakebin / "apt-get").chmod(0o755)
    # a venv of the old layout (a directory) is kept, exchanged for the link
    (prefix / "venv").mkdir(parents=True)
    (prefix / "venv" / "old-layout").write_text("x\n")

    r = _install(src, prefix, fakebin)
    assert r.returncode == 0, r.stdout + r.stderr
    assert not (top / "apt-get-ran").exists(), r.stdout
    venv = prefix / "venv"
    first = os.readlink(venv)
    version = re.search(r'__version__ = "([^"]+)"', (REPO / "hpcimage" / "__init__.py").read_text())[1]
    assert venv.is_symlink() and first.startswith(f"venvs/hpcimage-{version}-"), first
    # no setuptools start-up hook in the runtime's venv (it ran on every image-exec)
    assert not list((prefix / "venv").glob("lib/python*/site-packages/distutils-precedence.pth"))
    kept = [p for p in (prefix / "venvs").iterdir() if p.name.startswith("hpcimage-before-")]
    assert len(kept) == 1 and (kept[0] / "old-layout").exists()
    assert os.access(venv / "lib", os.F_OK)
    joiner = list((venv / "lib").glob("python3*/site-packages/hpcimage/runtime/mpi/hpcimage-join"))
    assert joiner and os.access(joiner[0], os.X_OK)
    assert (prefix / "bin" / "hpcimage").resolve() == (venv / "bin" / "hpcimage").resolve()

    # the same checkout again: nothing to do, nothing touched
    r = _install(src, prefix, fakebin, "--no-packages")
    assert r.returncode == 0 and "nothing to do" in r.stdout, r.stdout + r.stderr
    assert os.readlink(venv) == first

    # wrappers rendered for this prefix start the image as the user
    site = prefix / "site.yaml"
    site.write_text(textwrap.dedent(f"""\
        store: {demo_sqfs.parent}
        python: {venv}/bin/python3
        images:
          - name: Demo
            version: "1.0"
            file: {demo_sqfs.name}
        """))
    r = subprocess.run([str(prefix / "bin" / "hpcimage"), "generate", "--site", str(site),
                        "--prefix", str(prefix / "site")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    subprocess.run(["chmod", "-R", "a+rX", str(top)], check=True)
    env = {"HPCIMAGE_IMAGE": str(demo_sqfs), "HPCIMAGE_MODULE": "Demo/1.0",
           "PATH": f"{prefix}/site/wrappers:/usr/bin:/bin"}
    r = user.run([str(prefix / "site" / "wrappers" / "image-exec"), "cat", "/etc/os-release"],
                 env=env, cwd="/")
    assert r.returncode == 0 and "hpcimage Demo" in r.stdout, (r.stdout, r.stderr)

    # a changed checkout: a new venv beside the old one, the link switched, the old kept
    init = src / "hpcimage" / "__init__.py"
    init.write_text(init.read_text() + "# a new version\n")
    r = _install(src, prefix, fakebin)
    assert r.returncode == 0, r.stdout + r.stderr
    second = os.readlink(venv)
    assert second != first and (prefix / first).is_dir()
    assert (venv / "lib").exists()
    assert "# a new version" in subprocess.run(
        [str(venv / "bin" / "python3"), "-I", "-c",
         "import hpcimage, inspect; print(inspect.getsource(hpcimage))"],
        capture_output=True, text=True).stdout
    r = user.run([str(prefix / "site" / "wrappers" / "image-exec"), "true"], env=env, cwd="/")
    assert r.returncode == 0, r.stderr


def test_install_bad_usage(top):
    for args in (["relative/prefix"], ["--bogus"], ["a", "b"]):
        r = subprocess.run(["bash", str(INSTALL), "--no-packages", *args],
                           capture_output=True, text=True)
        assert r.returncode == 2, (args, r.stderr)
        assert r.stderr.startswith("install.sh: error: ") and r.stderr.count("\n") == 1, r.stderr


def test_a_failed_install_leaves_the_current_version(top):
    """A new version that does not import is never switched to, and nothing of it stays."""
    src, prefix, fakebin = top / "src", top / "apps", top / "fakebin"
    _checkout(src)
    fakebin.mkdir()
    (prefix / "venvs" / "hpcimage-old").mkdir(parents=True)
    (prefix / "venv").symlink_to("venvs/hpcimage-old")
    init = src / "hpcimage" / "__init__.py"
    init.write_text(init.read_text() + "raise RuntimeError('a broken version')\n")
    r = _install(src, prefix, fakebin, "--no-packages")
    assert r.returncode == 1, r.stdout + r.stderr
    assert r.stderr.splitlines()[-1] == (
        "install.sh: error: the new venv cannot import hpcimage (RuntimeError: a broken "
        f"version): {prefix}/venv left as it was"), r.stderr
    assert os.readlink(prefix / "venv") == "venvs/hpcimage-old"
    assert sorted(p.name for p in (prefix / "venvs").iterdir()) == ["hpcimage-old"]
