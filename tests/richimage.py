"""A demo image with everything `apptainer inspect`, `run-help` and `test` read: a
definition file, test and start scripts, a Docker-style env script and two SCI-F apps
(foo: help, labels, test, environment; bar: a runscript only), as a directory, a
SquashFS and a SIF (cached like conftest's images).

    from richimage import rich, rich_dir  # noqa: F401  (fixtures)
"""
import json
import os
import shutil
import subprocess

import pytest

from conftest import _cached, _mksquashfs, cli_argv

DEFFILE = "Bootstrap: busybox\n\n%runscript\n    echo hi > /dev/null && true\n"
TEST = '#!/bin/sh\n\necho "test: $# $*"\necho "DEMO_IMAGE=$DEMO_IMAGE"\nexit 3\n'
START = "#!/bin/sh\n\necho started\n"
DOCKER_ENV = "export FROM_DOCKER=1\n"
FOO_TEST = '#!/bin/sh\necho "foo test: $*"\nexit 4\n'
FOO_HELP = "Foo: the foo app.\n"
FOO_LABELS = {"SCIF_APP_NAME": "foo", "x": "<y>"}
FOO_ENV = "export FOO=1\n"
BAR_RUN = "#!/bin/sh\necho bar\n"


def _write(path, text, mode=0o644):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(text)
    os.chmod(path, mode)


def _rich_tree(path, demo):
    shutil.copytree(demo, path, symlinks=True)
    sd = os.path.join(path, ".singularity.d")
    _write(os.path.join(sd, "Singularity"), DEFFILE)
    _write(os.path.join(sd, "test"), TEST, 0o755)
    _write(os.path.join(sd, "startscript"), START, 0o755)
    _write(os.path.join(sd, "env", "10-docker2singularity.sh"), DOCKER_ENV, 0o755)
    foo = os.path.join(path, "scif/apps/foo/scif")
    _write(os.path.join(foo, "runscript.help"), FOO_HELP)
    _write(os.path.join(foo, "labels.json"), json.dumps(FOO_LABELS))
    _write(os.path.join(foo, "test"), FOO_TEST, 0o755)
    _write(os.path.join(foo, "env", "90-environment.sh"), FOO_ENV, 0o755)
    _write(os.path.join(path, "scif/apps/bar/scif/runscript"), BAR_RUN, 0o755)


@pytest.fixture(scope="session")
def rich_dir(demo_dir):
    return str(_cached("rich-v1", lambda p: _rich_tree(str(p), str(demo_dir))))


@pytest.fixture(scope="session")
def rich_sqfs(rich_dir):
    return str(_cached("rich-v1.sqfs", lambda p: _mksquashfs(rich_dir, p)))


@pytest.fixture(scope="session")
def rich_sif(rich_dir):
    def build(p):
        tmp = str(p) + ".sif"
        subprocess.run(cli_argv("build", tmp, str(rich_dir)), check=True,
                       stdout=subprocess.DEVNULL)
        os.rename(tmp, p)
    return str(_cached("rich-v1.sif", build))


@pytest.fixture(params=["dir", "sqfs", "sif"])
def rich(request, rich_dir, rich_sqfs, rich_sif):
    return str({"dir": rich_dir, "sqfs": rich_sqfs, "sif": rich_sif}[request.param])
