"""What enters the container: the environment of the command. Standard library only.

Rules (README "Environment"): the host environment passes, except PATH and
LD_LIBRARY_PATH (the image's own apply) and hpcimage's wrapper variables;
`--cleanenv` keeps only CLEANENV_KEEP. `SINGULARITYENV_X`, `APPTAINERENV_X`,
`HPCIMAGE_ENV_X` and `--env X=V` set X inside, later ones winning, after the image's
/.singularity.d/env scripts ran (so they override the image). `*_PREPEND_PATH` and
`*_APPEND_PATH` extend PATH.
"""
import os

from hpcimage.errors import EXIT_NOT_FOUND, EXIT_NOT_EXECUTABLE

DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
FORCE_PREFIXES = ("SINGULARITYENV_", "APPTAINERENV_", "HPCIMAGE_ENV_")
CLEANENV_KEEP = ("HOME", "USER", "LOGNAME", "TERM", "LANG", "LANGUAGE", "TZ",
                 "DISPLAY", "XAUTHORITY", "COLUMNS", "LINES")
CLEANENV_KEEP_PREFIXES = ("LC_",)
DROP = ("PATH", "LD_LIBRARY_PATH", "PS1", "HPCIMAGE_SITE_CONFIG", "HPCIMAGE_PYTHON",
        "PROMPT_COMMAND")


from hpcimage.runtime.options import valid_name as _valid_name


def compute(host_env, *, image_path, module=None, cleanenv=False, cli_env=(),
            home=None, keep_prefixes=()):
    """Return (env, forced, prepend, append).

    env: what the command starts with; forced: NAME -> value set after the image's
    env scripts; prepend/append: PATH pieces applied after them.
    """
    env = {}
    forced = {}
    for k, v in host_env.items():
        if k.startswith(FORCE_PREFIXES) or k in DROP:
            continue
        if cleanenv and not (k in CLEANENV_KEEP or k.startswith(CLEANENV_KEEP_PREFIXES)
                             or (keep_prefixes and k.startswith(tuple(keep_prefixes)))):
            continue
        env[k] = v
    for prefix in FORCE_PREFIXES:
        for k, v in host_env.items():
            if k.startswith(prefix):
                name = k[len(prefix):]
                if _valid_name(name):
                    forced[name] = v
    for k, v in cli_env:
        forced[k] = v
    prepend = forced.pop("PREPEND_PATH", None)
    append = forced.pop("APPEND_PATH", None)
    if home:
        env["HOME"] = home
    env["PATH"] = DEFAULT_PATH
    name = os.path.basename(image_path)
    for prefix in ("APPTAINER", "SINGULARITY"):
        env[prefix + "_CONTAINER"] = image_path
        env[prefix + "_NAME"] = name
    env["HPCIMAGE_CONTAINER"] = image_path
    if module:
        env["HPCIMAGE_MODULE"] = module
    env["PS1"] = f"[{module or name}] \\w> "
    return env, forced, prepend, append


def shell_prologue(forced, prepend, append, app=None):
    """The /bin/sh text that sources the image's env scripts (then, with APP, the
    app's /scif/apps/APP/scif/env/*.sh and its bin/ and lib/, as Apptainer does),
    then applies forced variables (passed in the environment as __HPCIMAGE_F_NAME,
    names validated). APP must be a valid app name (command.valid_app)."""
    lines = ['for __hpcimage_f in /.singularity.d/env/*.sh; do',
             '  [ -f "$__hpcimage_f" ] && . "$__hpcimage_f"',
             'done']
    if app is not None:
        assert all(c.isalnum() or c in "_.+-" for c in app)
        lines += [f'for __hpcimage_f in /scif/apps/{app}/scif/env/*.sh; do',
                  '  [ -f "$__hpcimage_f" ] && . "$__hpcimage_f"',
                  'done',
                  f'PATH="/scif/apps/{app}/bin:$PATH"; export PATH',
                  f'LD_LIBRARY_PATH="/scif/apps/{app}/lib${{LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}}"',
                  'export LD_LIBRARY_PATH']
    lines.append('unset __hpcimage_f')
    for name in forced:
        assert _valid_name(name)
        lines.append(f'{name}=$__HPCIMAGE_F_{name}; export {name}; unset __HPCIMAGE_F_{name}')
    if prepend is not None:
        lines.append('PATH="$__HPCIMAGE_PREPEND:$PATH"; export PATH; unset __HPCIMAGE_PREPEND')
    if append is not None:
        lines.append('PATH="$PATH:$__HPCIMAGE_APPEND"; export PATH; unset __HPCIMAGE_APPEND')
    return "\n".join(lines) + "\n"


# Why a command cannot run, said the same way by every launch path: the direct exec
# (command.py), the /bin/sh prologue below and hpcimage-join (mpi/recipe.py gives it these
# in the recipe): name -> (exit status, text after "PROG: error: CMD: "). {path}: the
# PATH searched, {error}: strerror. Plain text: no quotes, $, ` or \.
NOT_RUNNABLE = {
    "not_found": (EXIT_NOT_FOUND, "command not found in the image (PATH={path})"),
    "no_file": (EXIT_NOT_FOUND, "no such file in the image"),
    "is_dir": (EXIT_NOT_EXECUTABLE, "is a directory, not a program"),
    "not_exec": (EXIT_NOT_EXECUTABLE, "not executable (permission denied)"),
    "cannot_exec": (EXIT_NOT_EXECUTABLE, "cannot execute: {error}"),
}


# Resolve the command as the shell's `exec` will, and say what is wrong in one line with
# the direct path's words and statuses (command.exec_command): 127 not found, 126 not executable.
# No fork: `[` and `for` are builtins. The PATH search is done here because `command -v`
# also finds builtins and functions (that `exec` does not run) and, in busybox, files
# without the execute bit. A command with a '/' was checked by the launcher already (with
# its interpreter); __HPCIMAGE_HINT (optional) ends the not-found message.
_SHELL_EXEC = r'''
__hpcimage_c=$1
case $__hpcimage_c in
  */*) if [ ! -e "$__hpcimage_c" ]; then
         @no_file@
       elif [ -d "$__hpcimage_c" ]; then
         @is_dir@
       elif [ ! -x "$__hpcimage_c" ]; then
         @not_exec@
       fi ;;
  *) __hpcimage_p=
     IFS=:
     set -f
     for __hpcimage_d in $PATH; do
       if [ -f "${__hpcimage_d:-.}/$__hpcimage_c" ] && [ -x "${__hpcimage_d:-.}/$__hpcimage_c" ]; then
         __hpcimage_p=1
         break
       fi
     done
     if [ -z "$__hpcimage_p" ]; then
       @not_found@
     fi
     unset IFS __hpcimage_p __hpcimage_d ;;
esac
unset __hpcimage_c __HPCIMAGE_PROG __HPCIMAGE_HINT
exec "$@"
'''


def _shell_says(name):
    """The prologue's line for NOT_RUNNABLE[name] (its text is plain: no quoting needed)."""
    status, text = NOT_RUNNABLE[name]
    text = text.format(path="$PATH")
    return (f'echo "$__HPCIMAGE_PROG: error: $__hpcimage_c: {text}${{__HPCIMAGE_HINT-}}" >&2; '
            f"exit {status}")


SHELL_EXEC = _SHELL_EXEC
for _name in ("no_file", "is_dir", "not_exec", "not_found"):
    SHELL_EXEC = SHELL_EXEC.replace(f"@{_name}@", _shell_says(_name))
del _name


def shell_env(env, forced, prepend, append, prog, hint=""):
    """The environment for the /bin/sh prologue (HINT: appended to a not-found error)."""
    out = dict(env)
    for k, v in forced.items():
        out["__HPCIMAGE_F_" + k] = v
    if prepend is not None:
        out["__HPCIMAGE_PREPEND"] = prepend
    if append is not None:
        out["__HPCIMAGE_APPEND"] = append
    out["__HPCIMAGE_PROG"] = prog
    if hint:
        out["__HPCIMAGE_HINT"] = hint
    return out


def direct_env(env, forced, prepend, append):
    """The environment when no env script runs: forced values applied directly."""
    out = dict(env)
    out.update(forced)
    if prepend is not None:
        out["PATH"] = prepend + ":" + out["PATH"]
    if append is not None:
        out["PATH"] = out["PATH"] + ":" + append
    return out
