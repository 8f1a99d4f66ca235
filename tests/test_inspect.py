"""hpcimage inspect: an image's metadata without starting it, for every image kind."""
import json

import pytest

from conftest import cli_argv


def test_inspect_text_and_json(user, image):
    r = user.run(cli_argv("inspect", image))
    assert r.returncode == 0, r.stderr
    assert "org.label-schema.name: Demo" in r.stdout
    assert 'echo "Hello from $PRETTY_NAME"' in r.stdout
    assert "90-environment.sh:" in r.stdout and "export DEMO_IMAGE=1" in r.stdout
    assert "Demo 1.0: a busybox demo image." in r.stdout
    assert ("SIF objects:" in r.stdout) == image.endswith(".sif")
    r = user.run(cli_argv("inspect", "--json", image))
    info = json.loads(r.stdout)
    assert info["labels"]["org.label-schema.version"] == "1.0"
    assert list(info["environment"]) == ["10-first.sh", "50-second.sh", "90-environment.sh"]
    assert info["runscript"].startswith("#!/bin/sh")
    assert info["kind"] in ("sandbox", "squashfs", "sif")


def test_inspect_bare_image(user, bare):
    r = user.run(cli_argv("inspect", "--json", bare))
    info = json.loads(r.stdout)
    assert info["labels"] == {} and info["runscript"] is None and info["environment"] == {}


@pytest.mark.parametrize("path,msg", [("/no/such.sif", "image not found"),
                                      ("/etc/hostname", "not an image")])
def test_inspect_bad_input(user, path, msg):
    r = user.run(cli_argv("inspect", path))
    assert r.returncode == 2
    assert r.stderr.startswith(f"hpcimage: error: {path}: {msg}")
