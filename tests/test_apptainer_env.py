"""Issue 14 §3 (and §2's variables inside, §5's legacy /environment and `run --app`):
the container's environment as Apptainer builds it, seen by the non-root test user,
on an image without env scripts ("plain") and one with them ("scripts": a Docker-style
10-docker2singularity.sh, a 90-environment.sh that runs `set --`, Apptainer's
99-base.sh, and a script after it)."""
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

sys.path.insert(0, os.path.dirname(__file__))
import fakehost  # noqa: E402
from conftest import runtime_argv  # noqa: E402

from hpcimage.imagebuild import busybox  # noqa: E402

LIBS = "/.singularity.d/libs"
BINS = "/.singularity.d/bin"
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
LEGACY = Path(__file__).resolve().parents[2] / "shared/testdata/apptainer/e2e/legacy-environment"
if not LEGACY.exists():
    LEGACY = Path("/work/shared/testdata/apptainer/e2e/legacy-environment")

RUNSCRIPT = '#!/bin/sh\necho "run:$APPTAINER_COMMAND:$SINGULARITY_COMMAND:$WHO"\n'
DOCKER_ENV = ('export LD_LIBRARY_PATH="${LD_LIBRARY_PATH:-/opt/img/lib}"\n'
              'export PATH="/opt/img/bin:$PATH"\n')
ENVIRONMENT = 'set -- x\nexport IMGVAR=image\n'
BASE = ('if [ -z "$LD_LIBRARY_PATH" ]; then\n    LD_LIBRARY_PATH="/.singularity.d/libs"\n'
        'else\n    LD_LIBRARY_PATH="$LD_LIBRARY_PATH:/.singularity.d/libs"\nfi\n'
        'PS1="Apptainer> "\nexport LD_LIBRARY_PATH PS1\n')
LATE = 'export LATE_SAW="${INJ-unset}"\n'
AWK_APP = '#!/bin/awk -f\nBEGIN { print "awk app:", ARGV[1] }\n'


def _write(path, text, mode=0o644):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(mode)


def _image(base, name, scripts=(), legacy=False):
    root = base / name
    busybox.demo(str(root))
    env = root / ".singularity.d" / "env"
    shutil.rmtree(env)
    if legacy:
        (root / ".environment").unlink()
        _write(root / "environment", LEGACY.read_text())
    else:
        env.mkdir()
        for fname, text in scripts:
            _write(env / fname, text, 0o755)
    _write(root / ".singularity.d" / "runscript", RUNSCRIPT, 0o755)
    _write(root / "scif/apps/awkapp/scif/runscript", AWK_APP, 0o755)
    (root / "opt/img/bin").mkdir(parents=True, exist_ok=True)
    return str(root)


@pytest.fixture(scope="module")
def images():
    base = Path(tempfile.mkdtemp(prefix="hpcimage-envtest-", dir="/tmp"))
    base.chmod(0o755)
    out = {
        "plain": _image(base, "plain"),
        "scripts": _image(base, "scripts", [("10-docker2singularity.sh", DOCKER_ENV),
                                            ("90-environment.sh", ENVIRONMENT),
                                            ("99-base.sh", BASE), ("99-zlate.sh", LATE)]),
        "legacy": _image(base, "legacy", legacy=True),
    }
    noshell = base / "noshell" / "bin"
    noshell.mkdir(parents=True)
    shutil.copy2(busybox.find_busybox(), noshell / "busybox")
    out["noshell"] = str(base / "noshell")
    subprocess.run(["chmod", "-R", "a+rX", str(base)], check=True)
    yield out
    shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="module")
def fake_root():
    d = tempfile.mkdtemp(prefix="hpcimage-envtest-host-", dir="/tmp")
    os.chmod(d, 0o755)
    fakehost.build(d)
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def scratch():
    """A directory the test user can read (pytest's tmp_path is root's alone)."""
    d = Path(tempfile.mkdtemp(prefix="hpcimage-envtest-scratch-", dir="/tmp"))
    d.chmod(0o755)
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(params=["plain", "scripts"])
def kind(request):
    return request.param


def run(user, image, *cmd, env=None, opts=(), verb="image-exec", cwd=None):
    e = {"HPCIMAGE_IMAGE": image}
    e.update(env or {})
    return user.run(runtime_argv(verb, *opts, *cmd), env=e, cwd=cwd)


def show(user, image, *names, env=None, opts=()):
    """The values of names inside, one per line ("<unset>" for an unset one)."""
    script = "; ".join(f'echo "${{{n}-<unset>}}"' for n in names)
    r = run(user, image, "/bin/sh", "-c", script, env=env, opts=opts)
    assert r.returncode == 0, r.stderr
    return r.stdout.rstrip("\n").split("\n")


def image_path(kind):
    return {"plain": DEFAULT_PATH, "scripts": "/opt/img/bin:" + DEFAULT_PATH}[kind]


# ------------------------------------------------------------- evaluation (§3.1)

def test_values_are_evaluated_by_the_containers_shell(user, images, kind):
    img = images[kind]
    who, sing, ours, path, lit, home = show(
        user, img, "WHO", "SING", "OURS", "PATH", "LIT", "HOMEDIR",
        env={"APPTAINERENV_WHO": "$UID", "SINGULARITYENV_SING": "${HOME}/s",
             "HPCIMAGE_ENV_OURS": "$(echo sub)"},
        opts=("--env", "PATH=$PATH:/foo", "--env", "LIT=\\$HOME", "--env", "HOMEDIR=$HOME"))
    assert who == str(user.uid)
    assert sing == f"{user.home}/s" and ours == "sub"
    assert path == image_path(kind) + ":/foo"      # the image's PATH, extended
    assert lit == "$HOME" and home == user.home
    (path,) = show(user, img, "PATH", env={"APPTAINERENV_APPEND_PATH": "$HOME/bin"},
                   opts=("--env", "PREPEND_PATH=/p$IMGVAR"))
    pre = "/pimage:" if kind == "scripts" else "/p:"
    assert path == pre + image_path(kind) + f":{user.home}/bin"


def test_no_eval_takes_values_literally(user, images, kind):
    who, cli = show(user, images[kind], "WHO", "CLI", env={"APPTAINERENV_WHO": "$UID"},
                    opts=("--no-eval", "--env", "CLI=$(echo x) `y` \\$z"))
    assert (who, cli) == ("$UID", "$(echo x) `y` \\$z")


def test_plain_values_and_quotes_pass_unchanged(user, images, kind):
    (q,) = show(user, images[kind], "Q", opts=("--env", "Q=a 'b' \"c\" *"))
    assert q == "a 'b' \"c\" *"


def test_precedence_env_beats_env_file_beats_envvars(user, images, kind, scratch):
    f = scratch / "vars.env"
    f.write_text('# a comment\nBOTH="from file"\nFILE_ONLY=$HOME/f\nOVER=file\n'
                 "SPACED='a b'\n")
    f.chmod(0o644)
    both, file_only, over, spaced, low = show(
        user, images[kind], "BOTH", "FILE_ONLY", "OVER", "SPACED", "LOW",
        env={"APPTAINERENV_OVER": "envvar", "APPTAINERENV_LOW": "envvar",
             "SINGULARITYENV_LOW": "singularity"},
        opts=("--env-file", str(f), "--env", "BOTH=cli"))
    assert both == "cli"                    # --env beats --env-file
    assert over == "file"                   # --env-file beats APPTAINERENV_
    assert low == "envvar"                  # APPTAINERENV_ beats SINGULARITYENV_
    assert file_only == f"{user.home}/f" and spaced == "a b"


def test_injected_after_99_base_before_later_scripts(user, images):
    late, imgvar = show(user, images["scripts"], "LATE_SAW", "IMGVAR",
                        env={"APPTAINERENV_INJ": "x", "APPTAINERENV_IMGVAR": "mine"})
    assert late == "x"          # 99-zlate.sh, after 99-base.sh, sees the user's value
    assert imgvar == "mine"     # the user's value beats the image's 90-environment.sh


def test_unterminated_substitution_is_one_line_exit_2(user, images, kind):
    r = run(user, images[kind], "true", env={"APPTAINERENV_BAD": "$(echo x"})
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [
        "image-exec: error: APPTAINERENV_BAD: unterminated $( in '$(echo x' "
        "(write \\$ for a literal $, or use --no-eval)"]


def test_variable_that_cannot_be_set_is_said(user, images, kind):
    r = run(user, images[kind], "true", env={"APPTAINERENV_A.B": "1", "SINGULARITYENV_UID": "0"})
    assert r.returncode == 0
    assert set(r.stderr.splitlines()) == {
        "image-exec: warning: APPTAINERENV_A.B: not a variable name: not set in the container",
        "image-exec: warning: SINGULARITYENV_UID: the shell's own read-only variable: not set "
        "in the container"}
    r = run(user, images[kind], "true", opts=("--env", "UID=0"))
    assert r.returncode == 2
    assert r.stderr.strip() == ("image-exec: error: --env UID: UID is the shell's own "
                                "(read-only) variable")


def test_missing_env_file_exit_2(user, images, kind):
    r = run(user, images[kind], "true", opts=("--env-file", "/no/such.env"))
    assert r.returncode == 2
    assert r.stderr.strip() == "image-exec: error: --env-file /no/such.env: No such file or directory"


def test_evaluating_needs_a_shell(user, images):
    r = run(user, images["noshell"], "/bin/busybox", "true", env={"APPTAINERENV_X": "$HOME"})
    assert r.returncode == 2
    assert r.stderr.strip() == ("image-exec: error: APPTAINERENV_X: evaluating it needs "
                                "/bin/sh, which this image lacks (use --no-eval, or no $, ` "
                                "or \\ in the value)")
    r = run(user, images["noshell"], "/bin/busybox", "env",
            env={"APPTAINERENV_X": "$HOME"}, opts=("--no-eval",))
    assert r.returncode == 0, r.stderr
    assert "X=$HOME" in r.stdout.splitlines()
    # a value with nothing to evaluate needs no shell: exec'd directly, as before
    r = run(user, images["noshell"], "/bin/busybox", "env",
            env={"APPTAINERENV_X": "plain value", "A.B": "1"}, opts=("--env", "Y=z"))
    assert r.returncode == 0, r.stderr
    assert {"X=plain value", "Y=z", "A.B=1"} <= set(r.stdout.splitlines())


# --------------------------------------------------- the runtime's paths (§3.2)

def test_libs_and_bin_merged_last_whatever_the_user_sets(user, images, kind, fake_root):
    host = {"HPCIMAGE_HOST_ROOT": fake_root}
    own = {"plain": [], "scripts": ["/opt/img/lib"]}[kind]
    (ld, path) = show(user, images[kind], "LD_LIBRARY_PATH", "PATH", env=host, opts=("--nv",))
    assert ld.split(":") == own + [LIBS]             # after the image's own value
    assert path.split(":")[-1] == BINS
    (ld,) = show(user, images[kind], "LD_LIBRARY_PATH",
                 env=dict(host, SINGULARITYENV_LD_LIBRARY_PATH="/x"), opts=("--nv",))
    assert ld == f"/x:{LIBS}"
    (ld, path) = show(user, images[kind], "LD_LIBRARY_PATH", "PATH", env=host,
                      opts=("--nv", "--env", "LD_LIBRARY_PATH=/y:$LD_LIBRARY_PATH",
                            "--env", "PATH=/only"))
    assert ld.split(":") == ["/y"] + own + [LIBS]
    assert path == f"/only:{BINS}"


def test_dry_run_says_what_is_merged_last(user, images, fake_root):
    r = run(user, images["plain"], "true", env={"HPCIMAGE_HOST_ROOT": fake_root},
            opts=("--nv", "--dry-run", "--env", "A=$HOME"))
    assert r.returncode == 0, r.stderr
    assert f"  merge LD_LIBRARY_PATH {LIBS}  # last, at its end" in r.stdout
    assert "  env A='$HOME'  # forced, evaluated, after the env scripts" in r.stdout


# ------------------------------------------------ scripts cannot replace the command

def test_set_dash_dash_in_env_script_keeps_the_command(user, images, kind):
    r = run(user, images[kind], "echo", "one", "two")
    assert r.returncode == 0, r.stderr
    assert r.stdout == "one two\n"
    r = run(user, images[kind], "arg", opts=(), verb="image-run")
    assert r.returncode == 0, r.stderr


# ------------------------------------------------------ non-identifier host names

def test_odd_host_variable_passes_with_and_without_scripts(user, images, kind):
    r = run(user, images[kind], "env", env={"A.B": "1", "X-Y": "two words"})
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert "A.B=1" in lines and "X-Y=two words" in lines
    r = run(user, images[kind], "env", env={"A.B": "1"}, opts=("-e",))
    assert "A.B=1" not in r.stdout.splitlines()      # --cleanenv drops it, as Apptainer


# ---------------------------------------------- Apptainer's variables inside (§2)

def test_apptainer_variables_inside(user, images, kind, scratch):
    img = images[kind]
    d = scratch / "d"
    d.mkdir()
    names = ("COMMAND", "CONTAINER", "NAME", "ENVIRONMENT", "BIND")
    vals = show(user, img, *(f"{p}_{n}" for p in ("APPTAINER", "SINGULARITY") for n in names),
                env={"APPTAINER_BIND": f"{d}:/mnt/a"}, opts=("-B", f"{d}:/mnt/b:ro"))
    want = ["exec", img, os.path.basename(img), "/.singularity.d/env/91-environment.sh",
            f"{d}:/mnt/a,{d}:/mnt/b:ro"]
    assert vals == want + want
    r = run(user, img, verb="image-run")
    assert r.stdout == "run:run:run:\n", r.stderr
    r = run(user, img, "-c", 'echo "$APPTAINER_COMMAND $SINGULARITY_COMMAND"',
            verb="image-shell")
    assert r.stdout == "shell shell\n", r.stderr


# -------------------------------------------------- legacy /environment, run --app (§5)

def test_singularity2_environment_is_sourced(user, images):
    path, init, x = show(user, images["legacy"], "PATH", "APPTAINER_INIT", "X",
                         env={"APPTAINERENV_X": "$APPTAINER_INIT"})
    assert path.split(":")[0] == "/canary/path" and init == "1"
    assert x == "1"             # the user's variables come after it, as in Apptainer


def test_run_app_honours_the_runscripts_interpreter(user, images, kind):
    r = run(user, images[kind], "hello", opts=("--app", "awkapp"), verb="image-run")
    assert r.returncode == 0, r.stderr
    assert r.stdout == "awk app: hello\n"


# ------------------------------------- the prologue under each /bin/sh an image may have

@pytest.mark.parametrize("shell", [["/bin/dash"], ["/bin/bash"], ["/bin/busybox", "sh"]])
def test_prologue_keeps_the_command_and_declare_under_each_shell(shell, scratch):
    """bash (RHEL's /bin/sh) sources at top level (a script's `declare -x` stays global),
    the others in a function; under each, a script's `set --` leaves the command alone and
    a value is evaluated after 99-base.sh."""
    from hpcimage.runtime import environ as E
    if not os.access(shell[0], os.X_OK):
        pytest.skip(f"no {shell[0]} here")
    d = scratch / "env"
    d.mkdir()
    (d / "90-environment.sh").write_text(
        "set -- x\ndeclare -x DECL=yes 2>/dev/null || export DECL=yes\n")
    (d / "99-base.sh").write_text("export BASE=base\n")
    env, forced, pre, app, late = E.compute(
        {"HOME": "/h", "A.B": "1", "APPTAINERENV_WHO": "$BASE-$DECL"}, image_path="/i/x.sif",
        verb="exec", uid=1000, gid=1000)
    script = (E.shell_prologue(forced, pre, app, None, late) + E.SHELL_EXEC).replace(
        "/.singularity.d/env", str(d))
    r = subprocess.run(shell + ["-c", script, "hpcimage", "env"],
                       env=E.shell_env(env, forced, pre, app, "test", late=late),
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert {"WHO=base-yes", "DECL=yes", "A.B=1"} <= set(lines)
    assert not [ln for ln in lines if ln.split("=")[0].lower().startswith("__hpcimage")]


def test_shell_prompt_is_set_after_the_images_scripts(user, images, kind):
    """image-shell's prompt `[Module] \\w> ` is set after the image's env scripts (whose
    99-base.sh sets PS1="Apptainer> "), as Apptainer's shell action sets its own; a
    user's APPTAINERENV_PS1 wins; exec keeps what the scripts set."""
    img = images[kind]
    env = {"HPCIMAGE_MODULE": "Env/1.0"}
    r = run(user, img, "-c", 'echo "[$PS1]"', verb="image-shell", env=env)
    assert r.returncode == 0, r.stderr
    assert r.stdout == "[[Env/1.0] \\w> ]\n"
    r = run(user, img, "-c", 'echo "[$PS1]"', verb="image-shell",
            env=dict(env, APPTAINERENV_PS1="mine> "))
    assert r.stdout == "[mine> ]\n", r.stderr



def test_env_scripts_in_bash_syntax_run_under_the_images_bash(user, debian_sqfs, scratch):
    """A Debian image (/bin/sh is dash): an env script written in bash's syntax
    (`source`, `declare -x`, `[[ ]]`, as %environment sections often are) works, as in
    Apptainer, whose interpreter takes bash's syntax; a POSIX one still runs under the
    image's /bin/sh (bash through a fresh image mount costs ~20 ms a call)."""
    bashy = scratch / "95-bashism.sh"
    bashy.write_text('source /etc/os-release\ndeclare -x DISTRO="$ID"\n'
                     '[[ -n "$DISTRO" ]] && export BASHISM=ok\n')
    posix = scratch / "95-posix.sh"
    posix.write_text('export SHELLSEEN="$(readlink /proc/$$/exe)"\n')
    for f in (bashy, posix):
        f.chmod(0o644)
    r = run(user, debian_sqfs, "/bin/sh", "-c", 'echo "$DISTRO $BASHISM"',
            opts=("-B", f"{bashy}:/.singularity.d/env/95-bashism.sh"))
    assert r.returncode == 0, r.stderr
    assert r.stdout == "debian ok\n" and r.stderr == "", r.stderr
    r = run(user, debian_sqfs, "/bin/sh", "-c", 'echo "$SHELLSEEN"',
            opts=("-B", f"{posix}:/.singularity.d/env/95-posix.sh"))
    assert r.returncode == 0 and r.stdout == "/usr/bin/dash\n", (r.stdout, r.stderr)


def test_needs_bash_is_the_joiners_test():
    """command.needs_bash and hpcimage-join's test read the same tables."""
    from hpcimage.runtime import command
    src = (Path(__file__).resolve().parents[1] / "hpcimage" / "runtime" / "mpi"
           / "join.c").read_text()
    for word in command.BASH_STARTS + command.BASH_WITHIN:
        assert '"' + word.replace("\t", "\\t") + '"' in src, word
    assert command.needs_bash("x=1\n  source /a\n") and command.needs_bash("a=(1 2)\n")
    assert not command.needs_bash("# source x\n. /a\nexport B=$(date)\n[ -n x ]\n")
