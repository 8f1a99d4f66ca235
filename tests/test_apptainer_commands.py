"""The commands Apptainer users type besides exec/run/shell (issue 14 §6): `version`,
`test` (the image's %test, with the action flags), `run-help` (%help), on every image
kind, as the test user; their messages and exit statuses as Apptainer's where it has
them (cmd/internal/cli/run_help_linux.go, the test action of actions/*)."""
import subprocess

import pytest

from conftest import PY, REPO, cli_argv
from richimage import FOO_HELP, rich, rich_dir, rich_sif, rich_sqfs  # noqa: F401

NO_TEST = "hpcimage: no test script found in container, exiting\n"
NO_HELP = "No help sections were defined for this image\n"


def hpcimage(user, *args, **kw):
    return user.run(cli_argv(*args), **kw)


# ------------------------------------------------------------------ version

def test_version_is_the_bare_number(user):
    want = subprocess.run([PY, "-I", "-c", "import importlib.metadata as m; "
                           "print(m.version('hpcimage'))"],
                          capture_output=True, text=True, check=True).stdout
    r = hpcimage(user, "version")
    assert (r.returncode, r.stdout, r.stderr) == (0, want, "")
    r = hpcimage(user, "--version")
    assert (r.returncode, r.stdout) == (0, f"hpcimage version {want}")


def test_version_takes_no_argument(user):
    r = hpcimage(user, "version", "x")
    assert r.returncode == 2
    assert r.stderr == ("hpcimage: error: got unexpected extra argument (x) "
                        "(see 'hpcimage version --help')\n")


# ------------------------------------------------------------------ test

def test_test_runs_the_images_test_with_its_status(user, rich):
    r = hpcimage(user, "test", rich, "a", "b c")
    # the env scripts are sourced first (DEMO_IMAGE), the arguments reach it
    assert (r.returncode, r.stdout) == (3, "test: 2 a b c\nDEMO_IMAGE=1\n"), r.stderr


def test_test_of_an_app(user, rich):
    r = hpcimage(user, "test", "--app", "foo", rich, "x")
    assert (r.returncode, r.stdout) == (4, "foo test: x\n"), r.stderr
    r = hpcimage(user, "test", "--app", "bar", rich)
    assert (r.returncode, r.stdout) == (1, "")
    assert r.stderr == "hpcimage: error: no tests for contained app: bar (%apptest bar)\n"
    r = hpcimage(user, "test", "--app", "nope", rich)
    assert r.returncode == 2 and r.stderr.startswith("hpcimage: error: no app 'nope'")


def test_test_without_a_test_says_so_and_succeeds(user, image):
    r = hpcimage(user, "test", image)
    assert (r.returncode, r.stdout, r.stderr) == (0, "", NO_TEST)


def test_test_takes_the_action_flags(user, rich_sqfs, userdir):
    (userdir / "data").mkdir()
    r = hpcimage(user, "test", "-e", "--env", "DEMO_IMAGE=x", "-B", f"{userdir}:/mnt",
                 "--pwd", "/mnt", "--no-home", rich_sqfs, cwd=str(userdir))
    assert r.returncode == 3, r.stderr
    assert r.stdout == "test: 0 \nDEMO_IMAGE=x\n"      # --env wins over %environment
    r = hpcimage(user, "test", "--dry-run", rich_sqfs)
    assert r.returncode == 0 and "exec /.singularity.d/test" in r.stdout


@pytest.mark.parametrize("args,status,msg", [
    ((), 2, "no image given (usage: hpcimage test [OPTIONS] IMAGE ...)"),
    (("--bogus", "IMG"), 2, "no such option: --bogus (see 'hpcimage test --help')"),
    (("/no/such.sif",), 2, "/no/such.sif: image not found"),
])
def test_test_bad_input(user, rich_sqfs, args, status, msg):
    args = tuple(rich_sqfs if a == "IMG" else a for a in args)
    r = hpcimage(user, "test", *args)
    assert (r.returncode, r.stdout) == (status, "")
    assert r.stderr.startswith(f"hpcimage: error: {msg}"), r.stderr
    assert r.stderr.count("\n") == 1


def test_test_help(user):
    r = hpcimage(user, "test", "--help")
    assert r.returncode == 0 and r.stdout.startswith("usage: hpcimage test [OPTIONS] IMAGE")
    r = hpcimage(user, "--help")
    assert "  test " in r.stdout and "  run-help " in r.stdout and "  version " in r.stdout


# ------------------------------------------------------------------ run-help

def test_run_help(user, rich):
    r = hpcimage(user, "run-help", rich)
    assert (r.returncode, r.stdout, r.stderr) == (0, "Demo 1.0: a busybox demo image.\n", "")
    r = hpcimage(user, "run-help", "--app", "foo", rich)
    assert (r.returncode, r.stdout) == (0, FOO_HELP)
    r = hpcimage(user, "run-help", "--app", "bar", rich)       # an app without %apphelp
    assert (r.returncode, r.stdout) == (0, NO_HELP)


def test_run_help_without_help(user, bare):
    r = hpcimage(user, "run-help", bare)
    assert (r.returncode, r.stdout, r.stderr) == (0, NO_HELP, "")


@pytest.mark.parametrize("args,msg", [
    (("/no/such.sif",), "/no/such.sif: image not found"),
    (("/etc/hostname",), "/etc/hostname: not an image"),
    (("--app", "nope", "IMG"), "--app nope: no app 'nope' in IMG (its apps: bar, foo)"),
    ((), "missing argument 'IMAGE' (see 'hpcimage run-help --help')"),
])
def test_run_help_bad_input(user, rich_sqfs, args, msg):
    args = tuple(rich_sqfs if a == "IMG" else a for a in args)
    r = hpcimage(user, "run-help", *args)
    assert (r.returncode, r.stdout) == (2, "")
    assert r.stderr.startswith("hpcimage: error: " + msg.replace("IMG", rich_sqfs)), r.stderr
    assert r.stderr.count("\n") == 1


# ------------------------------------------------------------------ help, the others

def test_help_command(user):
    r = hpcimage(user, "help", "inspect")
    assert r.returncode == 0 and r.stdout.startswith("Usage: hpcimage inspect [OPTIONS] IMAGE")
    r = hpcimage(user, "help", "test")              # the runtime's own help
    assert r.returncode == 0 and r.stdout.startswith("usage: hpcimage test [OPTIONS] IMAGE")
    r = hpcimage(user, "help")
    assert r.returncode == 0 and "run-help" in r.stdout


@pytest.mark.parametrize("argv", [("cache", "clean"), ("oci", "run"),
                                  ("plugin", "list"), ("help", "remote")])
def test_apptainers_other_commands_are_refused_by_name(user, argv):
    name = argv[1] if argv[0] == "help" else argv[0]
    r = hpcimage(user, *argv)
    assert (r.returncode, r.stdout) == (2, "")
    assert r.stderr == (f"hpcimage: error: {name} is an Apptainer command that hpcimage "
                        "does not support (see 'hpcimage --help')\n")


def test_unknown_command_stays_unknown(user):
    r = hpcimage(user, "nope")
    assert (r.returncode, r.stderr) == (2, "hpcimage: error: no such command: nope "
                                           "(see 'hpcimage --help')\n")


# ------------------------------------------------------------------ the table

APPTAINER_COMMANDS = {
    "build", "cache", "capability", "checkpoint", "completion", "config", "delete", "exec",
    "help", "inspect", "instance", "key", "keyserver", "oci", "overlay", "plugin", "pull",
    "push", "registry", "remote", "run", "run-help", "search", "shell", "sif", "sign",
    "test", "verify", "version"}         # apptainer 1.3/1.4 `apptainer help`


def commands_table():
    text = (REPO / "docs" / "apptainer.md").read_text()
    section = text.split("<!-- section: commands -->", 1)[1].split("<!-- section:", 1)[0]
    rows = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("| `") and len(cells) == 3:
            rows[cells[0].strip("`")] = cells[1]
    return rows


def test_commands_table_matches_the_cli(user):
    """docs/apptainer.md "Commands" lists every Apptainer command with the status the
    CLI gives it: a 'not supported' one is refused by name, the others answer help."""
    rows = commands_table()
    assert set(rows) == APPTAINER_COMMANDS
    for name, status in sorted(rows.items()):
        r = hpcimage(user, "help", name)
        if status == "not supported":
            assert (r.returncode, r.stderr) == (2, f"hpcimage: error: {name} is an Apptainer "
                                                   "command that hpcimage does not support "
                                                   "(see 'hpcimage --help')\n"), name
        elif status in ("same", "differs"):
            assert r.returncode == 0 and r.stdout, (name, r.stderr)
        else:
            assert name == "pull" and status == "(pull)", (name, status)   # its owner's
