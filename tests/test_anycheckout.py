"""The test suite from any checkout: tests hand the test user copies of what it must
read (conftest.readable), never files of a checkout that user may not be able to enter
(a clone under /root, mode 0700)."""
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from conftest import REPO, TESTDATA, _tree_digest, readable
from modtools import module_script


def test_a_checkout_path_handed_to_the_test_user_is_refused(user):
    with pytest.raises(AssertionError, match="inside the checkout.*conftest.readable"):
        user.run(["cat", str(REPO / "images" / "Demo.def")])
    with pytest.raises(AssertionError, match="inside the checkout"):
        user.run(["sh", "-c", f"cat {REPO}/images/Demo.def"])
    with pytest.raises(AssertionError, match="inside the checkout"):
        module_script("lmod", f"cat {REPO}/README.md", user=user.name)
    r = user.run(["cat", str(readable("images/Demo.def"))])
    assert r.returncode == 0 and r.stdout == (REPO / "images" / "Demo.def").read_text()


def test_tests_pass_from_a_checkout_the_test_user_cannot_read(user):
    """One test that builds images/Demo.def as the test user, run by a nested pytest
    from a copy of this checkout in a directory only root may enter."""
    top = Path(tempfile.mkdtemp(prefix="hpcimage-checkout-"))
    try:
        assert top.stat().st_mode & 0o777 == 0o700
        clone = top / "hpcimage"
        skip = shutil.ignore_patterns(".git", "__pycache__", "*.pyc", "*.egg-info")
        shutil.copytree(REPO, clone, symlinks=True, ignore=lambda d, names: (
            skip(d, names) | ({"build"} if Path(d) == REPO else set())))
        # the same package: the nested session finds it installed (no reinstall)
        assert _tree_digest(clone / "hpcimage") == _tree_digest(REPO / "hpcimage")
        r = user.run(["cat", str(clone / "images" / "Demo.def")])
        assert r.returncode != 0 and "Permission denied" in r.stderr     # as under /root
        r = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q",
                            "tests/test_build_def.py::test_demo_def_offline"],
                           cwd=clone, env=dict(os.environ, HPCIMAGE_TESTDATA=str(TESTDATA)),
                           capture_output=True, text=True, timeout=600)
        assert r.returncode == 0 and "1 passed" in r.stdout, r.stdout[-4000:] + r.stderr
    finally:
        shutil.rmtree(top, ignore_errors=True)
