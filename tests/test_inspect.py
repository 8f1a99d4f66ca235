"""hpcimage inspect: an image's metadata without starting it, for every image kind, with
apptainer inspect's selectors, text and JSON layout (cmd/internal/cli/inspect.go,
pkg/inspect/metadata.go); `--summary` is hpcimage's own summary."""
import json

import pytest

from conftest import cli_argv
from richimage import (BAR_RUN, DEFFILE, DOCKER_ENV, FOO_ENV, FOO_HELP, FOO_LABELS,  # noqa: F401
                       FOO_TEST, START, TEST, rich, rich_dir, rich_sif, rich_sqfs)

LABELS = {"org.label-schema.build-agent": "hpcimage busybox",
          "org.label-schema.name": "Demo", "org.label-schema.version": "1.0"}
RUNSCRIPT = ('#!/bin/sh\n# Demo image runscript: say where we are, then run the arguments '
             'if any.\n. /etc/os-release\necho "Hello from $PRETTY_NAME"\n'
             'if [ $# -gt 0 ]; then exec "$@"; fi')
ENV90 = ("# Sourced by hpcimage and Apptainer before every command in the image.\n"
         'export DEMO_IMAGE=1\nexport PATH="/opt/demo/bin:$PATH"')
ENV = {"/.singularity.d/env/10-docker2singularity.sh": DOCKER_ENV.rstrip("\n"),
       "/.singularity.d/env/90-environment.sh": ENV90}


def inspect(user, *args, ok=True):
    r = user.run(cli_argv("inspect", *args))
    if ok:
        assert r.returncode == 0, r.stderr
        assert r.stderr == ""
    return r


def labels_text(labels):
    return "".join(f"{k}: {labels[k]}\n" for k in sorted(labels))


def test_default_is_labels_as_apptainer(user, rich):
    assert inspect(user, rich).stdout == labels_text(LABELS)
    assert inspect(user, "-l", rich).stdout == labels_text(LABELS)


@pytest.mark.parametrize("flag,want", [
    ("-r", RUNSCRIPT + "\n"), ("--runscript", RUNSCRIPT + "\n"),
    ("-d", DEFFILE.rstrip("\n") + "\n"), ("--deffile", DEFFILE.rstrip("\n") + "\n"),
    ("-t", TEST.rstrip("\n") + "\n"), ("--test", TEST.rstrip("\n") + "\n"),
    ("-s", START.rstrip("\n") + "\n"), ("--startscript", START.rstrip("\n") + "\n"),
    ("-H", "Demo 1.0: a busybox demo image.\n"),
    ("--helpfile", "Demo 1.0: a busybox demo image.\n"),
    # Apptainer's environment section: 10-docker*.sh and 9*-environment.sh only
    ("-e", "".join(f"=== {k} ===\n{v}\n\n" for k, v in sorted(ENV.items()))),
])
def test_one_section_as_text(user, rich, flag, want):
    assert inspect(user, flag, rich).stdout == want


def test_sections_in_apptainers_order(user, rich_sqfs):
    """Combined (short flags too): definition, runscript, ..., labels last, whatever
    order the flags come in."""
    out = inspect(user, "-lrd", rich_sqfs).stdout
    assert out == DEFFILE.rstrip("\n") + "\n" + RUNSCRIPT + "\n" + labels_text(LABELS)


def test_json_layout(user, rich):
    r = inspect(user, "--json", "-r", "-d", rich)
    assert r.stdout.startswith('{\n\t"data": {\n\t\t"attributes": {\n')
    assert "\\u003e" in r.stdout and "\\u0026\\u0026" in r.stdout    # as Go's encoder
    assert json.loads(r.stdout) == {"data": {"attributes": {
        "runscript": RUNSCRIPT, "deffile": DEFFILE.rstrip("\n")}}, "type": "container"}
    assert json.loads(inspect(user, "-j", rich).stdout) == {
        "data": {"attributes": {"labels": LABELS}}, "type": "container"}


def test_all_is_json_of_everything(user, rich):
    data = json.loads(inspect(user, "--all", rich).stdout)
    attrs = data["data"]["attributes"]
    # Apptainer's Attributes field order
    assert list(attrs) == ["apps", "environment", "labels", "runscript", "test", "helpfile",
                           "deffile", "startscript"]
    assert attrs["apps"] == {
        "bar": {"runscript": BAR_RUN.rstrip("\n")},
        "foo": {"environment": {"/scif/apps/foo/scif/env/90-environment.sh":
                                FOO_ENV.rstrip("\n")},
                "labels": FOO_LABELS, "test": FOO_TEST.rstrip("\n"),
                "helpfile": FOO_HELP.rstrip("\n")}}
    assert attrs["environment"] == ENV and attrs["labels"] == LABELS
    assert attrs["test"] == TEST.rstrip("\n") and attrs["startscript"] == START.rstrip("\n")
    assert data["type"] == "container"
    # --all ignores --app, as Apptainer's
    assert inspect(user, "--all", "--app", "foo", rich).stdout == \
        inspect(user, "--all", rich).stdout


def test_apps(user, rich):
    assert inspect(user, "--list-apps", rich).stdout == "bar\nfoo\n"
    assert inspect(user, "--app", "foo", rich).stdout == labels_text(FOO_LABELS)
    assert inspect(user, "--app", "foo", "-H", "-t", rich).stdout == \
        FOO_TEST.rstrip("\n") + "\n" + FOO_HELP
    assert inspect(user, "--app", "foo", "-e", rich).stdout == \
        f"=== /scif/apps/foo/scif/env/90-environment.sh ===\n{FOO_ENV}\n"
    assert json.loads(inspect(user, "--app", "bar", "-r", "--json", rich).stdout) == {
        "data": {"attributes": {"apps": {"bar": {"runscript": BAR_RUN.rstrip("\n")}}}},
        "type": "container"}
    assert inspect(user, "--app", "bar", "-H", rich).stdout == ""     # it has none


def test_summary_keeps_hpcimages_view(user, image):
    r = inspect(user, "--summary", image)
    assert "org.label-schema.name: Demo" in r.stdout
    assert 'echo "Hello from $PRETTY_NAME"' in r.stdout
    assert "90-environment.sh:" in r.stdout and "export DEMO_IMAGE=1" in r.stdout
    assert "Demo 1.0: a busybox demo image." in r.stdout
    assert ("SIF objects:" in r.stdout) == image.endswith(".sif")


def test_inspect_bare_image(user, bare):
    assert json.loads(inspect(user, "--json", bare).stdout) == {
        "data": {"attributes": {}}, "type": "container"}
    assert inspect(user, bare).stdout == ""
    assert inspect(user, "--list-apps", "-r", "-e", bare).stdout == ""


@pytest.mark.parametrize("path,msg", [("/no/such.sif", "image not found"),
                                      ("/etc/hostname", "not an image")])
def test_inspect_bad_input(user, path, msg):
    r = inspect(user, path, ok=False)
    assert r.returncode == 2
    assert r.stderr.startswith(f"hpcimage: error: {path}: {msg}")


@pytest.mark.parametrize("args,msg", [
    (("--app", "nope"), "--app nope: no app 'nope' in {img} (its apps: bar, foo)"),
    (("--app", "../foo"), "--app ../foo: no app '../foo' in {img} (its apps: bar, foo)"),
    (("--summary", "-r"), "--summary is hpcimage's own text summary and takes no other "
                          "option (--all --json: every section as JSON) (see 'hpcimage "
                          "inspect --help')"),
    (("--labelz",), "no such option: --labelz"),
    (("-x",), "no such option: -x"),
])
def test_inspect_refuses(user, rich_sqfs, args, msg):
    r = inspect(user, *args, rich_sqfs, ok=False)
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.startswith("hpcimage: error: " + msg.format(img=rich_sqfs)), r.stderr
    assert r.stderr.count("\n") == 1
