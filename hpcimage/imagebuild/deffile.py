"""Definition files (Apptainer syntax) -> typed stages. Parses only; builds nothing.

    Bootstrap: debootstrap          # the header: `Keyword: value` lines
    OSVersion: bookworm
    MirrorURL: http://deb.debian.org/debian
    Stage: build                    # a name for multi-stage builds

    %arguments                      # KEY=default; `{{ KEY }}` anywhere is replaced
        SUITE=bookworm
    %setup                          # on the host, $HPCIMAGE_ROOTFS (= $APPTAINER_ROOTFS)
    %files [from STAGE]             # SRC [DST] lines, copied before %post
    %post [-c /bin/bash]            # in the image, as root (of the build namespace)
    %environment %runscript %startscript %test %labels %help
    %appinstall APP  %apprun APP  %appenv APP  %applabels APP  %apphelp APP
    %appfiles APP  %apptest APP     # SCI-F apps under /scif/apps/APP

A line that starts with `%` and a letter is a section header wherever it appears
(inside a script too); an unknown one is an error. A new `Bootstrap:` line after
sections starts the next stage; the last stage is the
image. `{{ NAME }}` is replaced before parsing by --build-arg NAME=VALUE or by the
default from a %arguments section (an undefined NAME is an error). Every error is a
UsageError naming the file and the line (`file.def:12: ...`, exit 2).
"""
import re
import shlex
import textwrap

from hpcimage.errors import UsageError

# Header keywords Apptainer accepts (its validHeaders), lower-cased; otherurlN too.
HEADER_KEYS = ("bootstrap", "from", "includecmd", "mirrorurl", "updateurl", "osversion",
               "include", "library", "registry", "namespace", "stage", "product", "user",
               "regcode", "productpgp", "registerurl", "modules", "otherurl",
               "fingerprints", "setopt", "confurl")
SCRIPT_SECTIONS = ("setup", "post", "environment", "runscript", "startscript", "test",
                   "help")
SECTIONS = SCRIPT_SECTIONS + ("files", "labels", "arguments")
APP_SECTIONS = ("appinstall", "apprun", "appenv", "applabels", "apphelp", "appfiles",
                "apptest")
AGENTS = ("localimage", "scratch", "busybox", "debootstrap", "docker", "docker-archive",
          "docker-daemon", "oci", "oci-archive", "oras", "library", "shub", "yum", "dnf",
          "zypper", "arch", "buildkit")
# The syntax, as regular expressions that read beside Apptainer's parser
# (pkg/build/types/parser/deffile.go: scanDefinitionFile cuts the file at each line that
# starts with '%' and a letter; doHeader reads `Key: value` lines; build arguments are
# `{{ NAME }}`):
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]*\Z")          # a stage or app name
ARG_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")             # a build argument's name
ARG_RE = re.compile(r"\{\{\s*([A-Za-z0-9_.\-]*)\s*\}\}")          # {{ NAME }}
SECTION_RE = re.compile(r"%([A-Za-z]+)(?:[ \t]+(.*?))?[ \t]*\Z")  # %NAME [ARGS]
HEADER_RE = re.compile(r"\s*([A-Za-z][A-Za-z0-9]*)\s*:\s*(.*?)\s*\Z")  # Key: value
OTHERURL_RE = re.compile(r"otherurl[0-9]+\Z")                   # otherurl1, otherurl2...


def valid_name(s):
    """A stage or app name: NAME_RE."""
    return NAME_RE.match(s) is not None


def valid_arg_name(s):
    """A build argument's name: ARG_NAME_RE."""
    return ARG_NAME_RE.match(s) is not None


def _section_match(ln):
    """`%NAME[ ARGS]` (SECTION_RE): (NAME, ARGS without the spaces and tabs around it,
    or None when there is nothing after NAME), or None when the line is no such thing."""
    m = SECTION_RE.match(ln)
    return (m[1], m[2]) if m else None


def _substitute(ln, value):
    """Every `{{ NAME }}` of ln (ARG_RE) replaced by value(NAME), left to right."""
    return ARG_RE.sub(lambda m: value(m[1]), ln)


class Section:
    """One %section: its name, the text after the name (args), its body and lines."""

    __slots__ = ("name", "args", "body", "line")

    def __init__(self, name, args, body, line):
        self.name, self.args, self.body, self.line = name, args, body, line

    def __repr__(self):
        return f"Section(%{self.name} {self.args!r}, line {self.line})"


class FileEntry:
    __slots__ = ("src", "dst", "line")

    def __init__(self, src, dst, line):
        self.src, self.dst, self.line = src, dst, line

    def __repr__(self):
        return f"FileEntry({self.src!r} -> {self.dst!r})"


class App:
    """A SCI-F app: its sections by short name (install, run, env, labels, help,
    files, test)."""

    def __init__(self, name, line):
        self.name = name
        self.line = line
        self.sections = {}      # "install" -> Section
        self.files = []         # FileEntry (from %appfiles)
        self.labels = {}

    def script(self, what):
        s = self.sections.get(what)
        return s.body if s else None


class Stage:
    def __init__(self, index, line):
        self.index = index
        self.line = line
        self.header = {}        # lower-cased keyword -> value
        self.header_lines = {}  # keyword -> line number
        self.sections = {}      # script section name -> Section (repeated ones joined)
        self.files = []         # [(from_stage or None, [FileEntry], line)]
        self.labels = {}        # in order
        self.arguments = {}     # from %arguments
        self.apps = {}          # name -> App, in order of first appearance

    @property
    def bootstrap(self):
        return self.header.get("bootstrap", "").lower()

    @property
    def name(self):
        return self.header.get("stage")

    def get(self, key, default=None):
        return self.header.get(key.lower(), default)

    def script(self, name):
        s = self.sections.get(name)
        return s.body if s else None


class Definition:
    def __init__(self, path, text, stages, arguments):
        self.path = path
        self.text = text            # after {{ }} substitution (what goes into the image)
        self.stages = stages
        self.arguments = arguments  # the values used

    @property
    def final(self):
        return self.stages[-1]

    def stage_named(self, name):
        for s in self.stages:
            if s.name == name:
                return s
        return None


def load(path, build_args=None, display=None):
    try:
        with open(path, "rb") as f:
            data = f.read(16 << 20)
    except FileNotFoundError:
        raise UsageError(f"{path}: no such definition file") from None
    except OSError as e:
        raise UsageError(f"{path}: cannot read: {e.strerror}") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        raise UsageError(f"{display or path}:{line}: not UTF-8 text") from None
    return parse(text, display or str(path), build_args)


def _err(display, line, msg):
    return UsageError(f"{display}:{line}: {msg}")


def parse(text, display="definition file", build_args=None):
    """Parse TEXT (named DISPLAY in errors) into a Definition."""
    text = text.replace("\r\n", "\n")
    if "\x00" in text:
        raise _err(display, text[:text.index("\x00")].count("\n") + 1, "NUL byte in the file")
    lines = text.split("\n")
    args = _collect_arguments(lines, display)
    for k, v in (build_args or {}).items():
        if not valid_arg_name(k):
            raise UsageError(f"--build-arg {k}: not a valid argument name")
        args[k] = (v, 0)
    used = set()
    out = []
    for n, ln in enumerate(lines, 1):
        def repl(name, n=n):
            if name not in args:
                raise _err(display, n, f"{{{{ {name} }}}}: undefined build argument "
                           f"(define it in %arguments or pass --build-arg {name}=VALUE)")
            used.add(name)
            return args[name][0]
        out.append(_substitute(ln, repl) if "{{" in ln else ln)
    for k in build_args or {}:
        if k not in used:
            import sys
            print(f"hpcimage: warning: --build-arg {k} is not used by {display}",
                  file=sys.stderr)
    stages = _parse_lines(out, display)
    return Definition(display, "\n".join(out), stages,
                      {k: v for k, (v, _) in args.items()})


def _collect_arguments(lines, display):
    """{NAME: (default, line)} from every %arguments section."""
    args = {}
    inside = False
    for n, ln in enumerate(lines, 1):
        m = _section_match(ln)
        if m and m[0].lower() in SECTIONS + APP_SECTIONS:
            inside = m[0].lower() == "arguments"
            continue
        if not inside:
            continue
        s = ln.strip()
        if not s or s.startswith("#"):
            continue
        k, eq, v = s.partition("=")
        k = k.strip()
        if not eq or not valid_arg_name(k):
            raise _err(display, n, f"%arguments: want NAME=VALUE, got {s!r}")
        v = v.strip()
        if len(v) >= 2 and v[0] == v[-1] and v[0] in "'\"":
            v = v[1:-1]
        args[k] = (v, n)
    return args


def _parse_lines(lines, display):
    stages = []
    stage = None
    cur = None          # (name, args, start line, [body lines])

    def close():
        nonlocal cur
        if cur is not None:
            _add_section(stage, *cur, display)
        cur = None

    for n, ln in enumerate(lines, 1):
        if ln.startswith("%"):
            m = _section_match(ln)
            word = m[0].lower() if m else ln[1:].split()[0].lower() if ln[1:].split() else ""
            if word in SECTIONS or word in APP_SECTIONS:
                if stage is None:
                    raise _err(display, n, f"%{word} before any header: a definition "
                               "file starts with 'Bootstrap: AGENT'")
                close()
                cur = (word, (m[1] or "").strip() if m else "", n, [])
                continue
            # `%` and a letter at the start of a line is a section header wherever it
            # is, inside a script too (a misspelt `%hlep` after `%runscript` must not
            # become part of the runscript). Only `%` followed by something else (`%%`,
            # `%-8s`, `% x`) stays script text; in the header and in %files, %labels,
            # %arguments it is an error too.
            if re.match(r"%[A-Za-z]", ln) or cur is None or cur[0] in (
                    "files", "labels", "arguments", "appfiles", "applabels"):
                raise _err(display, n, f"unknown section %{word} (sections: "
                           + ", ".join("%" + s for s in SECTIONS + APP_SECTIONS) + ")")
        if cur is not None:
            key = None if ln[:1].isspace() else _header_key(ln)
            if key and key[0].lower() == "bootstrap":
                close()
                stage = _new_stage(stages, n)
                _set_header(stage, key, n, display)
                continue
            cur[3].append(ln)
            continue
        # header lines
        s = ln.strip()
        if not s or s.startswith("#"):
            continue
        key = _header_key(ln)
        if key is None:
            raise _err(display, n, f"expected 'Keyword: value' in the header, got {s!r}")
        if stage is None:
            if key[0].lower() != "bootstrap":
                raise _err(display, n, f"the first header keyword must be Bootstrap, "
                           f"not {key[0]}")
            stage = _new_stage(stages, n)
        elif key[0].lower() == "bootstrap" and "bootstrap" in stage.header:
            stage = _new_stage(stages, n)
        _set_header(stage, key, n, display)
    close()
    if not stages:
        raise _err(display, 1, "empty definition file: no 'Bootstrap:' header")
    names = {}
    for st in stages:
        _check_stage(st, display)
        if st.name:
            if st.name in names:
                raise _err(display, st.header_lines["stage"],
                           f"Stage: {st.name} used twice (also line {names[st.name]})")
            names[st.name] = st.header_lines["stage"]
    for st in stages:
        for frm, entries, line in st.files:
            if frm is None:
                continue
            idx = next((s.index for s in stages if s.name == frm), None)
            if idx is None:
                raise _err(display, line, f"%files from {frm}: no stage named {frm!r}")
            if idx >= st.index:
                raise _err(display, line, f"%files from {frm}: stage {frm!r} must come "
                           "before the stage that copies from it")
    return stages


def _header_match(ln):
    """`KEY: VALUE` (HEADER_RE): (KEY, VALUE without the blanks around it), or None."""
    m = HEADER_RE.match(ln)
    return (m[1], m[2]) if m else None


def _known_key(k):
    """k (lower case) is a header keyword: one of HEADER_KEYS, or otherurlN."""
    return k in HEADER_KEYS or OTHERURL_RE.match(k) is not None


def _header_key(ln):
    m = _header_match(ln)
    if not m:
        return None
    if _known_key(m[0].lower()):
        return m
    if ln[:1].isspace():
        return None         # indented "foo: bar" inside a script is script text
    return m


def _new_stage(stages, line):
    st = Stage(len(stages), line)
    stages.append(st)
    return st


def _set_header(stage, key, line, display):
    k, v = key[0].lower(), key[1]
    if not _known_key(k):
        raise _err(display, line, f"unknown header keyword {key[0]!r} (known: "
                   + ", ".join(sorted(h for h in HEADER_KEYS)) + ")")
    if k in stage.header:
        raise _err(display, line, f"{key[0]}: given twice in one stage "
                   f"(also line {stage.header_lines[k]})")
    if k == "bootstrap":
        v = v.lower()
        if v not in AGENTS:
            raise _err(display, line, f"Bootstrap: unknown agent {key[1]!r} (one of "
                       + ", ".join(AGENTS) + ")")
    if k == "stage" and not valid_name(v):
        raise _err(display, line, f"Stage: {v!r} is not a valid stage name")
    stage.header[k] = v
    stage.header_lines[k] = line


def _check_stage(st, display):
    agent = st.bootstrap
    if agent not in ("scratch", "busybox") and not st.get("from") and agent not in (
            "debootstrap", "yum", "dnf", "zypper", "arch", "buildkit"):
        raise _err(display, st.line, f"Bootstrap: {agent} needs a From: line")
    if agent == "debootstrap" and not st.get("osversion"):
        raise _err(display, st.line, "Bootstrap: debootstrap needs OSVersion: (e.g. bookworm)")
    if agent == "scratch" and st.get("from"):
        raise _err(display, st.header_lines["from"], "Bootstrap: scratch takes no From:")


def _add_section(stage, name, args, line, body_lines, display):
    while body_lines and not body_lines[-1].strip():
        body_lines.pop()
    body = "\n".join(body_lines) + ("\n" if body_lines else "")
    if name in ("help", "apphelp"):
        body = textwrap.dedent(body).lstrip("\n")
    first = line + 1
    if name in APP_SECTIONS:
        words = args.split()
        if not words:
            raise _err(display, line, f"%{name} needs an app name (%{name} NAME)")
        app_name = words[0]
        if not valid_name(app_name) or len(words) > 1 and not words[1].startswith("#"):
            raise _err(display, line, f"%{name} {args}: want one app name of letters, "
                       "digits, '_', '.', '+', '-'")
        app = stage.apps.get(app_name)
        if app is None:
            app = stage.apps[app_name] = App(app_name, line)
        short = name[3:]
        if short in app.sections:
            raise _err(display, line, f"%{name} {app_name}: given twice (also line "
                       f"{app.sections[short].line})")
        app.sections[short] = Section(name, args, body, line)
        if short == "files":
            app.files = _file_entries(body_lines, first, display, name)
        elif short == "labels":
            app.labels = _labels(body_lines, first, display)
        return
    if name == "arguments":
        stage.arguments.update(_collect_arguments(["%arguments"] + body_lines, display))
        return
    if name == "files":
        frm = None
        a = args.split("#")[0].split()
        if a:
            if len(a) != 2 or a[0] != "from":
                raise _err(display, line, f"%files {args}: want '%files' or "
                           "'%files from STAGE'")
            frm = a[1]
        stage.files.append((frm, _file_entries(body_lines, first, display, name), line))
        return
    if name == "labels":
        stage.labels.update(_labels(body_lines, first, display))
        return
    if name in ("post", "setup", "test", "runscript", "startscript"):
        _script_args(args, line, display, name)
    prev = stage.sections.get(name)
    if prev is not None:
        if prev.args != args:
            raise _err(display, line, f"%{name} given twice with different arguments "
                       f"(also line {prev.line})")
        stage.sections[name] = Section(name, args, prev.body + body, prev.line)
    else:
        stage.sections[name] = Section(name, args, body, line)


def _script_args(args, line, display, name):
    """Validate `%post -c /bin/bash` style section arguments (Apptainer's)."""
    a = args.split("#")[0].split()
    if a and "-c" in a and a.index("-c") == len(a) - 1:
        raise _err(display, line, f"%{name} -c: missing the interpreter (%{name} -c /bin/bash)")


def script_argv(section, script_path):
    """argv running SCRIPT_PATH for a script section, as Apptainer does: `/bin/sh -ex
    SCRIPT`, or with `%post -c /bin/bash`: `/bin/sh -ex -c '/bin/bash SCRIPT'`."""
    params = (section.args.split("#")[0].split()) if section else []
    argv = ["/bin/sh", "-ex"]
    if "-c" in params:
        i = params.index("-c")
        return argv + params[:i] + ["-c", " ".join(params[i + 1:]) + " " + shlex.quote(script_path)]
    return argv + params + [script_path]


def _file_entries(body_lines, first, display, name):
    out = []
    for n, ln in enumerate(body_lines, first):
        s = ln.strip()
        if not s or s.startswith("#"):
            continue
        try:
            words = shlex.split(s, comments=True)
        except ValueError as e:
            raise _err(display, n, f"%{name}: {e}") from None
        if not words:
            continue
        if len(words) > 2:
            raise _err(display, n, f"%{name}: want 'SRC [DST]', got {s!r} (quote paths "
                       "with spaces)")
        out.append(FileEntry(words[0], words[1] if len(words) > 1 else None, n))
    return out


def _labels(body_lines, first, display):
    labels = {}
    for n, ln in enumerate(body_lines, first):
        s = ln.strip()
        if not s or s.startswith("#"):
            continue
        k, _, v = s.partition(" ")
        if "\t" in k:
            k, _, v2 = k.partition("\t")
            v = v2 + (" " + v if v else "")
        labels[k] = v.strip()
    return labels
