"""What enters the container: the environment of the command. Standard library only.

Rules (README "Environment", docs/apptainer.md "Environment inside the container"), in
Apptainer's order: the host environment passes, except PATH and LD_LIBRARY_PATH (the
image's own apply) and hpcimage's wrapper variables; `--cleanenv` keeps only
CLEANENV_KEEP. The image's /.singularity.d/env scripts run (a Singularity 2 image's
/environment where it has no /.singularity.d/env). Right after 99-base.sh (after the
last script where there is none) the user's variables are set: `SINGULARITYENV_X`,
`APPTAINERENV_X`, `HPCIMAGE_ENV_X`, then `--env-file`, then `--env X=V`, later ones
winning; their values are evaluated by the container's shell as the body of a
double-quoted string (`$X`, `${X}`, `$(cmd)`, `\\$` a literal $) unless `--no-eval`.
Then `*_PREPEND_PATH`/`*_APPEND_PATH`/`PATH`, then the paths the runtime injects
(/.singularity.d/libs on LD_LIBRARY_PATH, /.singularity.d/bin on PATH) are merged
last: moved (or added) to the end, whatever the image or the user set.

Nothing of this costs anything when no such variable or flag is set: the command is
then exec'd directly where the image has no env scripts, as before.
"""
import os

from hpcimage.errors import UsageError, EXIT_NOT_FOUND, EXIT_NOT_EXECUTABLE

DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
FORCE_PREFIXES = ("SINGULARITYENV_", "APPTAINERENV_", "HPCIMAGE_ENV_")
CLEANENV_KEEP = ("HOME", "USER", "LOGNAME", "TERM", "LANG", "LANGUAGE", "TZ",
                 "DISPLAY", "XAUTHORITY", "COLUMNS", "LINES")
CLEANENV_KEEP_PREFIXES = ("LC_",)
DROP = ("PATH", "LD_LIBRARY_PATH", "PS1", "HPCIMAGE_SITE_CONFIG", "HPCIMAGE_PYTHON",
        "PROMPT_COMMAND",
        # an encrypted image's passphrase stays outside (runtime/crypt.py)
        "HPCIMAGE_ENCRYPTION_PASSPHRASE", "APPTAINER_ENCRYPTION_PASSPHRASE",
        "SINGULARITY_ENCRYPTION_PASSPHRASE")
# Set by Apptainer inside the container, as APPTAINER_X and SINGULARITY_X.
RUNTIME_PREFIXES = ("APPTAINER", "SINGULARITY")
ENVIRONMENT_FILE = "/.singularity.d/env/91-environment.sh"
# The image's script after which the user's variables are set (Apptainer's injection
# point); a Singularity 2 image's environment file.
BASE_SCRIPT = "/.singularity.d/env/99-base.sh"
LEGACY_ENVIRONMENT = "/environment"
# Names the user's variables cannot set: bash's read-only ones (Apptainer skips them too).
NOT_SETTABLE = ("UID", "GID")
# Characters that make the shell evaluate a value.
EVAL_CHARS = ("$", "`", "\\")


from hpcimage.runtime.options import valid_name as _valid_name


class Late:
    """What is applied in the container's shell besides the forced values: whether they
    are evaluated (not --no-eval), the --env-file text, the runtime's paths merged last
    ({NAME: [path, ...]}), the host variables whose names a shell cannot hold
    ({NAME: value}: they reach the command through the image's env program), uid/gid
    (the shell's $UID/$GID where it has none, as Apptainer's interpreter sets them).
    Plain data: the MPI recipe and --dry-run read it."""
    __slots__ = ("evaluate", "envfile", "inject", "odd", "uid", "gid", "sources", "skipped",
                 "path_eval")

    def __init__(self, evaluate=True, envfile=None, inject=None, odd=None, uid=None,
                 gid=None, sources=None, skipped=()):
        self.evaluate, self.envfile = evaluate, envfile
        self.inject, self.odd = inject or {}, odd or {}
        self.uid, self.gid, self.sources = uid, gid, sources or {}
        self.skipped = list(skipped)    # (variable, why): said as warnings
        self.path_eval = False          # PREPEND_PATH or APPEND_PATH to evaluate


def evaluated(value, late):
    """value is evaluated by the shell (it has $, ` or \\ and --no-eval is off)."""
    return late is not None and late.evaluate and any(c in value for c in EVAL_CHARS)


def needs_shell(forced, late):
    """The container's shell must run even where the image has no env scripts."""
    if late is None:
        return False
    return (late.envfile is not None or late.path_eval
            or any(evaluated(v, late) for v in forced.values()))


def dq_body(value):
    """value as the body of a double-quoted sh string, as Apptainer writes it
    (export K="V" with only its double quotes escaped): $, ` and \\ keep their meaning;
    a lone trailing backslash stays one."""
    out = []
    i, n = 0, len(value)
    while i < n:
        c = value[i]
        if c == "\\":
            if i + 1 < n:
                out.append(value[i:i + 2])
                i += 2
                continue
            out.append("\\\\")
        elif c == '"':
            out.append('\\"')
        else:
            out.append(c)
        i += 1
    return "".join(out)


def unterminated(value):
    """What a shell would find unterminated in value as a double-quoted body ("$(",
    "${", "`"), or None. A cheap scan: the shell has the last word."""
    stack = []
    i, n = 0, len(value)
    while i < n:
        c = value[i]
        if c == "\\":
            i += 2
            continue
        if c == "`":
            if stack and stack[-1] == "`":
                stack.pop()
            else:
                stack.append("`")
        elif c == "$" and value[i + 1:i + 2] in ("(", "{"):
            stack.append(")" if value[i + 1] == "(" else "}")
            i += 2
            continue
        elif c == "(" and stack and stack[-1] == ")":
            stack.append(")")
        elif stack and c == stack[-1] and c in ")}":
            stack.pop()
        i += 1
    if not stack:
        return None
    return {")": "$(", "}": "${", "`": "`"}[stack[0]]


def compute(host_env, *, image_path, module=None, cleanenv=False, cli_env=(),
            home=None, keep_prefixes=(), verb=None, binds=(), envfile=None,
            no_eval=False, uid=None, gid=None):
    """Return (env, forced, prepend, append, late).

    env: what the command starts with; forced: NAME -> value set after the image's
    env scripts (in precedence order, evaluated unless no_eval); prepend/append: PATH
    pieces applied after them; late: environ.Late. envfile: the text of --env-file.
    """
    env = {}
    forced = {}
    sources = {}
    odd = {}
    skipped = []
    for k, v in host_env.items():
        if k.startswith(FORCE_PREFIXES) or k in DROP:
            continue
        if cleanenv and not (k in CLEANENV_KEEP or k.startswith(CLEANENV_KEEP_PREFIXES)
                             or (keep_prefixes and k.startswith(tuple(keep_prefixes)))):
            continue
        if _valid_name(k):
            env[k] = v
        else:
            odd[k] = v
    for prefix in FORCE_PREFIXES:
        for k, v in host_env.items():
            if k.startswith(prefix):
                name = k[len(prefix):]
                if _valid_name(name) and name not in NOT_SETTABLE:
                    forced.pop(name, None)
                    forced[name] = v
                    sources[name] = k
                else:
                    skipped.append((k, "the shell's own read-only variable"
                                    if name in NOT_SETTABLE else "not a variable name"))
    for k, v in cli_env:
        if k in NOT_SETTABLE:
            raise UsageError(f"--env {k}: {k} is the shell's own (read-only) variable")
        forced.pop(k, None)
        forced[k] = v
        sources[k] = f"--env {k}"
    if verb == "shell" and "PS1" not in forced:
        # The shell's prompt, set after the image's scripts as Apptainer's shell action
        # sets its own (an image's 99-base.sh sets PS1="Apptainer> "); the user's
        # *ENV_PS1 or --env PS1 wins.
        forced = {"PS1": f"[{module or os.path.basename(image_path)}] \\w> ", **forced}
        sources["PS1"] = "the prompt"
    late = Late(not no_eval, envfile, None, odd, uid, gid, sources, skipped)
    for k, v in forced.items():
        if evaluated(v, late):
            what = unterminated(v)
            if what:
                raise UsageError(f"{sources[k]}: unterminated {what} in {v!r} (write \\$ "
                                 f"for a literal $, or use --no-eval)")
    prepend = forced.pop("PREPEND_PATH", None)
    append = forced.pop("APPEND_PATH", None)
    late.path_eval = any(v is not None and evaluated(v, late) for v in (prepend, append))
    if home:
        env["HOME"] = home
    env["PATH"] = DEFAULT_PATH
    name = os.path.basename(image_path)
    bind = ",".join(binds)
    for prefix in RUNTIME_PREFIXES:
        env[prefix + "_CONTAINER"] = image_path
        env[prefix + "_NAME"] = name
        env[prefix + "_ENVIRONMENT"] = ENVIRONMENT_FILE
        if verb:
            env[prefix + "_COMMAND"] = verb
        env[prefix + "_BIND"] = bind
    env["HPCIMAGE_CONTAINER"] = image_path
    if module:
        env["HPCIMAGE_MODULE"] = module
    env["PS1"] = f"[{module or name}] \\w> "
    return env, forced, prepend, append, late


def merge_paths(value, paths):
    """value (a :-list) with paths moved or added to its end, in order."""
    keep = [x for x in (value or "").split(":") if x and x not in paths]
    return ":".join(keep + list(paths))


def _sq(s):
    return "'" + s.replace("'", "'\\''") + "'"


def shell_prologue(forced, prepend, append, app=None, late=None):
    """The /bin/sh text that sources the image's env scripts (a Singularity 2 image's
    /environment where it has no /.singularity.d/env; with APP, the app's
    /scif/apps/APP/scif/env/*.sh and its bin/ and lib/ where the image has no
    95-apps.sh to do it), in a function, so that a script's `set --` cannot replace the
    command; sets the forced variables (passed in the environment as
    __HPCIMAGE_F_NAME, names validated) right after 99-base.sh, or after the last
    script; then PATH's pieces and the runtime's paths. APP must be a valid app name
    (command.valid_app)."""
    lines = []
    ev = late is not None and late.evaluate
    if needs_shell(forced, late):
        # $UID and $GID, as bash and Apptainer's interpreter have them
        if late.uid is not None:
            lines.append(f"case ${{UID-}} in '') UID={int(late.uid)};; esac")
        if late.gid is not None:
            lines.append(f"case ${{GID-}} in '') GID={int(late.gid)};; esac")
    lines.append("__hpcimage_inject() {")
    cli = [k for k in forced if late is not None and
           late.sources.get(k, "").startswith("--env ")]
    order = [k for k in forced if k not in cli] + ["\0envfile"] + cli
    for name in order:
        if name == "\0envfile":        # after *ENV_X, before --env X=V
            if late is not None and late.envfile is not None:
                lines.append('  set -a; eval "$__HPCIMAGE_ENVFILE"; set +a; '
                             'unset __HPCIMAGE_ENVFILE')
            continue
        value = forced[name]
        assert _valid_name(name)
        var = "__hpcimage_path" if name == "PATH" else name
        if ev and any(c in value for c in EVAL_CHARS):
            lines.append(f'  eval "{var}=\\"$__HPCIMAGE_F_{name}\\""')
        else:
            lines.append(f'  {var}=$__HPCIMAGE_F_{name}')
        lines.append(f"  unset __HPCIMAGE_F_{name}" + ("" if var != name else f"; export {name}"))
    for key, var in (("PREPEND", prepend), ("APPEND", append)):
        if var is None:
            continue
        if ev and any(c in var for c in EVAL_CHARS):
            lines.append(f'  eval "__HPCIMAGE_{key}=\\"$__HPCIMAGE_{key}\\""')
    lines += ["  __hpcimage_i=1", "  :", "}"]
    body = ["if [ -d /.singularity.d/env ]; then",
            "  for __hpcimage_f in /.singularity.d/env/*.sh; do",
            '    [ -f "$__hpcimage_f" ] || continue']
    if app is not None:
        assert all(c.isalnum() or c in "_.+-" for c in app)
        body += [f'    [ "$__hpcimage_f" != {BASE_SCRIPT} ] || __hpcimage_app']
    body += ['    . "$__hpcimage_f"',
             f'    [ "$__hpcimage_f" != {BASE_SCRIPT} ] || __hpcimage_inject',
             "  done",
             f"elif [ -f {LEGACY_ENVIRONMENT} ]; then",
             f"  . {LEGACY_ENVIRONMENT}",
             "fi"]
    if app is not None:
        body.append("__hpcimage_app")
    # A script's `set --` must not replace the command. bash (RHEL's /bin/sh) keeps the
    # command in an array and sources at top level, where `declare -x` stays global;
    # other shells (dash, busybox) source inside a function, whose `set --` is its own.
    lines += ["__hpcimage_env() {"] + ["  " + ln for ln in body] + ["}"]
    if app is not None:
        lines += ["__hpcimage_a=",
                  "__hpcimage_app() {",
                  '  [ -z "$__hpcimage_a" ] || return 0',
                  "  __hpcimage_a=1",
                  "  [ ! -f /.singularity.d/env/95-apps.sh ] || return 0",
                  f'  for __hpcimage_g in /scif/apps/{app}/scif/env/*.sh; do',
                  '    [ ! -f "$__hpcimage_g" ] || . "$__hpcimage_g"',
                  '  done',
                  f'  PATH="/scif/apps/{app}/bin:$PATH"; export PATH',
                  f'  LD_LIBRARY_PATH="/scif/apps/{app}/lib${{LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}}"',
                  '  export LD_LIBRARY_PATH',
                  "}"]
    lines += ["__hpcimage_i=",
              'if [ -n "${BASH_VERSION-}" ]; then',
              """  eval '__hpcimage_argv=("$@")'"""]
    lines += ["  " + ln for ln in body]
    lines += ["""  eval 'set -- "${__hpcimage_argv[@]}"'; unset __hpcimage_argv""",
              "else",
              '  __hpcimage_env "$@"',
              "fi",
              '[ -n "$__hpcimage_i" ] || __hpcimage_inject',
              "unset __hpcimage_f __hpcimage_g __hpcimage_i __hpcimage_a"]
    if "PATH" in forced:
        lines.append('PATH=$__hpcimage_path; unset __hpcimage_path')
    if prepend is not None:
        lines.append('PATH="$__HPCIMAGE_PREPEND:$PATH"; unset __HPCIMAGE_PREPEND')
    if append is not None:
        lines.append('PATH="$PATH:$__HPCIMAGE_APPEND"; unset __HPCIMAGE_APPEND')
    lines.append("export PATH")
    for name, paths in (late.inject.items() if late is not None else ()):
        assert _valid_name(name) and all(":" not in p for p in paths)
        lines += [f"__hpcimage_v=; __hpcimage_IFS=${{IFS-unset}}; IFS=:; set -f",
                  f"for __hpcimage_p in ${name}; do",
                  f"  case $__hpcimage_p in ''{''.join('|' + _sq(p) for p in paths)}) ;; "
                  f'*) __hpcimage_v="$__hpcimage_v$__hpcimage_p:" ;; esac',
                  "done",
                  "set +f",
                  'if [ "$__hpcimage_IFS" = unset ]; then unset IFS; else IFS=$__hpcimage_IFS; fi',
                  f"{name}=\"$__hpcimage_v{':'.join(paths)}\"; export {name}",
                  "unset __hpcimage_v __hpcimage_p __hpcimage_IFS"]
    unset_fns = "unset -f __hpcimage_env __hpcimage_inject" + (" __hpcimage_app" if app else "")
    lines.append(unset_fns)
    if late is not None and late.odd:
        assigns = " ".join(_sq(f"{k}={v}") for k, v in late.odd.items())
        lines += ["__hpcimage_run() {",
                  "  for __hpcimage_e in /usr/bin/env /bin/env; do",
                  f'    [ ! -x "$__hpcimage_e" ] || exec "$__hpcimage_e" -- {assigns} "$@"',
                  "  done",
                  "  unset __hpcimage_e",
                  '  exec "$@"',
                  "}"]
    else:
        lines += ['__hpcimage_run() { exec "$@"; }']
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
__hpcimage_run "$@"
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


def shell_env(env, forced, prepend, append, prog, hint="", late=None):
    """The environment for the /bin/sh prologue (HINT: appended to a not-found error):
    values to evaluate as double-quoted bodies; no variable whose name the shell cannot
    hold (the prologue passes those)."""
    out = dict(env)
    for k, paths in (late.inject.items() if late is not None else ()):
        # the scripts start without them (an image's `${LD_LIBRARY_PATH:-default}`
        # keeps its default); merged last
        rest = [x for x in out.get(k, "").split(":") if x and x not in paths]
        if rest:
            out[k] = ":".join(rest)
        else:
            out.pop(k, None)
    for k, v in forced.items():
        out["__HPCIMAGE_F_" + k] = dq_body(v) if evaluated(v, late) else v
    if prepend is not None:
        out["__HPCIMAGE_PREPEND"] = dq_body(prepend) if evaluated(prepend, late) else prepend
    if append is not None:
        out["__HPCIMAGE_APPEND"] = dq_body(append) if evaluated(append, late) else append
    if late is not None and late.envfile is not None:
        out["__HPCIMAGE_ENVFILE"] = late.envfile
    out["__HPCIMAGE_PROG"] = prog
    if hint:
        out["__HPCIMAGE_HINT"] = hint
    return out


def direct_env(env, forced, prepend, append, late=None):
    """The environment when no shell runs: forced values applied literally (nothing to
    evaluate: needs_shell() is false), PATH's pieces, the runtime's paths merged last,
    the host variables whose names a shell cannot hold."""
    out = dict(env)
    out.update(forced)
    if prepend is not None:
        out["PATH"] = prepend + ":" + out["PATH"]
    if append is not None:
        out["PATH"] = out["PATH"] + ":" + append
    if late is not None:
        for k, paths in late.inject.items():
            out[k] = merge_paths(out.get(k), paths)
        for k, v in late.odd.items():
            out[k] = v
    return out
