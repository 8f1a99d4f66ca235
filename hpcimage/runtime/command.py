"""The command inside the container: its working directory, the app (SCI-F), and the
exec that replaces the launcher (env scripts first through /bin/sh; 126/127 as a
shell says them). Standard library only: the hot path."""
import os
import stat

from hpcimage.errors import (HpcimageError, UsageError, EXIT_NOT_FOUND, EXIT_NOT_EXECUTABLE,
                             EXIT_USAGE)
from hpcimage.runtime import environ
from hpcimage.linux import procstate
from hpcimage.linux.paths import which
from hpcimage.image.magic import head_kind


SHELLS = ("/bin/bash", "/bin/sh")


RUNSCRIPT = "/.singularity.d/runscript"
TESTSCRIPT = "/.singularity.d/test"


ENV_DIR = "/.singularity.d/env"


# Env scripts written in bash's syntax (Apptainer runs them with an interpreter that takes
# it): a line that starts with one of BASH_STARTS, or holds one of BASH_WITHIN, outside a
# comment. Such scripts run under the image's /bin/bash; all others under its /bin/sh
# (bash read through a fresh squashfuse mount costs ~20 ms a call). hpcimage-join
# (join.c) applies the same test.
BASH_STARTS = ("source ", "source\t", "declare ", "typeset ", "function ", "shopt ", "[[ ")
BASH_WITHIN = (" [[ ", "=(")


def needs_bash(text):
    """Whether shell text uses bash's syntax (BASH_STARTS, BASH_WITHIN)."""
    for line in text.splitlines():
        s = line.lstrip()
        if s and s[0] != "#" and (s.startswith(BASH_STARTS) or any(w in s for w in BASH_WITHIN)):
            return True
    return False


def script_shell(app=None):
    """The shell that runs the prologue and the image's env scripts (in the container):
    /bin/bash when the image has it and a script (/.singularity.d/env/*.sh, the legacy
    /environment, the app's scif/env/*.sh) needs it, else /bin/sh."""
    if not os.access("/bin/bash", os.X_OK):
        return "/bin/sh"
    dirs = [ENV_DIR] + ([app_dir(app) + "/scif/env"] if app else [])
    files = [environ.LEGACY_ENVIRONMENT]
    for d in dirs:
        try:
            files += [d + "/" + n for n in sorted(os.listdir(d)) if n.endswith(".sh")]
        except OSError:
            pass
    for f in files:
        try:
            with open(f, errors="replace") as fh:
                if needs_bash(fh.read(1 << 20)):
                    return "/bin/bash"
        except OSError:
            pass
    return "/bin/sh"


def is_rank0(environ):
    """Not an MPI rank, or rank 0 (warnings are said once per job)."""
    return next((environ[k] for k in ("PMIX_RANK", "PMI_RANK", "OMPI_COMM_WORLD_RANK",
                                      "SLURM_PROCID") if environ.get(k)), "0") == "0"


def valid_app(name):
    """A SCI-F app name: letters, digits and '_.+-', not starting with '.' or '-'."""
    return bool(name) and name[0] not in ".-+" and all(
        c.isalnum() and c.isascii() or c in "_.+-" for c in name)


def label(prog):
    """What a message of `prog` starts with, errors and warnings alike: an image-*
    wrapper's name, else "hpcimage" (as main writes errors of `hpcimage exec`)."""
    return prog if prog.startswith("image-") else "hpcimage"


def app_dir(app):
    return f"/scif/apps/{app}/scif"


# An explicit --pwd that the container lacks (status 2; hpcimage-join says it too).
BAD_PWD = "--pwd {dir}: no such directory in the container"


def enter_workdir(workdir, home, explicit, note=None, prog=None):
    """chdir to workdir; else (not --pwd) to home, else to /, saying so on stderr
    when prog is given (the MPI probes run silently). note "system": workdir is the
    caller's directory, a system directory not bound: the image's own, if any."""
    say = prog and is_rank0(os.environ)
    try:
        os.chdir(workdir)
        if note == "system" and say:
            os.write(2, f"{label(prog)}: warning: cannot enter the host's {workdir} in the "
                        f"container (a system directory: the image's own is there); "
                        f"running in the image's {workdir}\n".encode())
        return
    except OSError as e:
        if explicit:
            raise UsageError(BAD_PWD.format(dir=workdir)) from None
        why = e.strerror
    where = "/"
    for d in (home, "/"):
        try:
            os.chdir(d)
            where = d
            break
        except OSError:
            continue
    if say:
        os.write(2, f"{label(prog)}: warning: cannot enter {workdir} in the container ({why}); "
                    f"running in {where}\n".encode())


def exec_command(verb, args, env, forced, prepend, append, prog, app=None, rcfile=None,
                 late=None):
    has_sh = os.access("/bin/sh", os.X_OK)
    if app is not None and not os.path.isdir(app_dir(app)):
        raise UsageError(f"no app {app!r} in this image (hpcimage apps IMAGE "
                         "lists them)")
    if verb == "run" and app is not None:
        runscript = app_dir(app) + "/runscript"
        if not os.path.isfile(runscript):
            raise HpcimageError(f"app {app!r} has no runscript (%apprun {app})")
        # as the main runscript: its own #! interpreter when it is executable
        argv = ([runscript] if os.access(runscript, os.X_OK) or not has_sh
                else ["/bin/sh", runscript]) + args
    elif verb == "run":
        if not os.path.isfile(RUNSCRIPT):
            raise HpcimageError(f"this image has no runscript ({RUNSCRIPT}); "
                                "use exec or shell")
        argv = ([RUNSCRIPT] if os.access(RUNSCRIPT, os.X_OK) or not has_sh
                else ["/bin/sh", RUNSCRIPT]) + args
    elif verb == "test":
        argv = _test_argv(app, prog, has_sh) + args
    elif verb == "shell":
        sh = env.get("APPTAINER_SHELL") or env.get("SINGULARITY_SHELL")
        if not sh:
            sh = next((s for s in SHELLS if os.access(s, os.X_OK)), None)
            if sh is None:
                raise HpcimageError("this image has no shell (/bin/bash, /bin/sh)",
                                    EXIT_NOT_FOUND)
        # bash: not the user's ~/.bashrc; Lmod's init/bash where the site has Lmod
        # inside (an interactive bash reads no BASH_ENV).
        if sh.endswith("/bash"):
            opt = ["--rcfile", rcfile] if rcfile and os.path.isfile(rcfile) else ["--norc"]
        else:
            opt = []
        argv = [sh] + opt + args
    else:
        argv = args
    cmd = argv[0]
    hint = _hint(prog, verb, cmd)
    if verb == "exec" and "/" in cmd and hint and _is_image(cmd):
        raise HpcimageError(f"{cmd}: is an image, not a program{hint}",
                            EXIT_NOT_EXECUTABLE)
    shell = environ.needs_shell(forced, late)
    if shell and not has_sh:
        name = next((k for k, v in forced.items() if environ.evaluated(v, late)), None)
        what = (late.sources.get(name, name) if name else "--env-file")
        raise HpcimageError(f"{what}: evaluating it needs /bin/sh, which this image lacks "
                            "(use --no-eval, or no $, ` or \\ in the value)", EXIT_USAGE)
    scripts = has_sh and (shell or app is not None)
    if has_sh and not scripts:
        try:
            scripts = any(n.endswith(".sh") for n in os.listdir(ENV_DIR))
        except OSError:     # a Singularity 2 image's /environment, where there is no ENV_DIR
            scripts = os.path.isfile(environ.LEGACY_ENVIRONMENT)
    if scripts:
        if "/" in cmd:      # the shell's own exec error is raw: say it here, as below
            why = _why_not(cmd)
            if why:
                raise HpcimageError(f"{cmd}: {why[0]}{hint}", why[1])
        e = environ.shell_env(env, forced, prepend, append, label(prog), hint, late)
        script = environ.shell_prologue(forced, prepend, append, app, late) + environ.SHELL_EXEC
        procstate.for_exec()
        sh = script_shell(app)
        os.execve(sh, [sh, "-c", script, "hpcimage"] + argv, e)
    e = environ.direct_env(env, forced, prepend, append, late)
    path = which(cmd, e.get("PATH", environ.DEFAULT_PATH))
    if path is None:
        text, status = _says("not_found", path=e.get("PATH", ""))
        raise HpcimageError(f"{cmd}: {text}{hint}", status)
    procstate.for_exec()
    try:
        os.execve(path, argv, e)
    except OSError as e2:
        why = _why_not(path) or _says("cannot_exec", error=e2.strerror)
        raise HpcimageError(f"{cmd}: {why[0]}{hint}", why[1]) from None


def _test_argv(app, prog, has_sh):
    """`test`: the image's (or the app's) test script, as Apptainer's test action runs
    it; an image without one says so and exits 0, an app without one is an error."""
    script = app_dir(app) + "/test" if app is not None else TESTSCRIPT
    if not os.path.isfile(script):
        if app is not None:
            raise HpcimageError(f"no tests for contained app: {app} (%apptest {app})")
        os.write(2, f"{label(prog)}: no test script found in container, exiting\n".encode())
        raise SystemExit(0)
    return [script] if os.access(script, os.X_OK) or not has_sh else ["/bin/sh", script]


IMAGE_SUFFIXES = (".sif", ".sqfs", ".squashfs", ".img", ".simg")


def _hint(prog, verb, cmd):
    """What a user probably meant by a command the image cannot run: the Apptainer
    habit of naming the image first (image-exec IMAGE CMD), or a script in the current
    directory named without ./ ("" when nothing comes to mind)."""
    if verb == "exec" and prog.startswith("image-") and (
            cmd.endswith(IMAGE_SUFFIXES) or _is_image(cmd)):
        also = ", or use 'hpcimage exec IMAGE CMD'" if prog == "image-exec" else ""
        return f"; {prog} runs the loaded module's image: drop the image argument{also}"
    if "/" not in cmd and os.path.isfile(cmd):
        return f"; did you mean ./{cmd}?"
    return ""


def _is_image(path):
    """path (as seen from here) is a SIF or SquashFS file or a sandbox directory."""
    try:
        if os.path.isdir(path):
            return os.path.isdir(os.path.join(path, ".singularity.d"))
        with open(path, "rb") as f:
            head = f.read(42)
    except OSError:
        return False
    return head_kind(head) is not None


def _says(name, **values):
    """(text, status) of environ.NOT_RUNNABLE[name], its {placeholders} filled."""
    status, text = environ.NOT_RUNNABLE[name]
    return text.format(**values), status


def _why_not(path, interpreter=True):
    """(message, status) saying why path cannot be executed, None when it looks runnable:
    missing (127), a directory or without execute permission (126; access() also sees a
    noexec mount), a script whose #! interpreter is missing (127) or not executable."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return _says("no_file")
    except OSError as e:
        return _says("cannot_exec", error=e.strerror)
    if stat.S_ISDIR(st.st_mode):
        return _says("is_dir")
    if not stat.S_ISREG(st.st_mode) or not os.access(path, os.X_OK):
        return _says("not_exec")
    if interpreter:
        try:
            with open(path, "rb") as f:
                head = f.read(256)
        except OSError:
            return None
        if head[:2] == b"#!":
            words = head[2:].split(b"\n")[0].split()
            if words:
                interp = words[0].decode(errors="replace")
                why = _why_not(interp, False)
                if why:
                    return f"bad interpreter {interp}: {why[0]}", why[1]
    return None
