"""Definition files (Apptainer syntax) -> typed stages. Parses only; builds nothing.

    Bootstrap: debootstrap          # the header: `Keyword: value` lines, cut at `#`;
    OSVersion: bookworm             #   a value ending in `\\` goes on on the next line
    MirrorURL: http://deb.debian.org/debian
    Stage: build                    # a name for multi-stage builds

    %arguments                      # KEY=default for `{{ KEY }}` in this stage
        SUITE=bookworm
    %pre                            # on the host, before the bootstrap agent
    %setup                          # on the host, $HPCIMAGE_ROOTFS (= $APPTAINER_ROOTFS)
    %files [from STAGE]             # SRC [DST] lines, copied before %post
    %post [-c /bin/bash]            # in the image, as root (of the build namespace)
    %environment %runscript %startscript %test %labels %help
    %appinstall APP  %apprun APP  %appenv APP  %applabels APP  %apphelp APP
    %appfiles APP  %apptest APP  %appstart APP     # SCI-F apps under /scif/apps/APP

This reads a file as Apptainer's parser reads it (pkg/build/types/parser/deffile.go and
internal/pkg/build/args/reader.go; the regular expressions below are stated beside
theirs):

- the file is cut into stages at every line starting with `Bootstrap:` (STAGE_RE, any
  case); text before the first one is a stage of its own when it holds anything but
  comments (a definition without a header parses; building it is refused);
- in each stage `{{ NAME }}` (ARG_RE: a word) is replaced by --build-arg NAME=VALUE or
  by the stage's own %arguments default, except where the text before it on its line
  holds `#` and a character other than `!` (COMMENT_RE: a comment); an undefined NAME
  is an error; other `{{ ... }}` text (`{{.Id}}`) is left alone;
- a line whose first word starts with `%` starts a section (SECTION_RE), indented or
  not; its name is that word without the `%`s, in any case; an unknown name is an error;
- the header is everything of a stage before its first section.

Every error is a UsageError naming the file and the line (`file.def:12: ...`, exit 2).
`check(d)` adds what a build needs (a Bootstrap header with a known agent, From:, stage
names, `%files from` an earlier stage).
"""
import re
import shlex
import sys

from hpcimage.errors import UsageError

# ----------------------------------------------------------------------- keywords
# Every header keyword and section of Apptainer's parser (its validHeaders, validSections
# and appSections), with hpcimage's status: "same", "differs" (how), or "not supported"
# (what happens). docs/apptainer.md's `deffile` section is checked against this table
# (tests/test_deffile.py).
KEYWORDS = (
    ("Bootstrap", "header", "same", "the agent; library, shub, yum, dnf, zypper, arch, "
     "docker-daemon and buildkit are refused (exit 2), see docs/build.md"),
    ("From", "header", "same", ""),
    ("Stage", "header", "same", ""),
    ("Registry", "header", "same", "docker agent"),
    ("Namespace", "header", "same", "docker agent"),
    ("IncludeCmd", "header", "same", "docker agent: the image's CMD is in the runscript "
     "either way (as Apptainer's default)"),
    ("OSVersion", "header", "same", "debootstrap"),
    ("MirrorURL", "header", "same", "debootstrap"),
    ("Include", "header", "same", "debootstrap"),
    ("UpdateURL", "header", "not supported", "accepted by the parser; only yum/zypper "
     "read it and those agents are refused"),
    ("Library", "header", "not supported", "accepted by the parser; Bootstrap: library "
     "is refused"),
    ("Fingerprints", "header", "not supported", "accepted by the parser; Bootstrap: "
     "library is refused"),
    ("Product", "header", "not supported", "zypper (refused)"),
    ("User", "header", "not supported", "zypper (refused)"),
    ("Regcode", "header", "not supported", "zypper (refused)"),
    ("ProductPGP", "header", "not supported", "zypper (refused)"),
    ("RegisterURL", "header", "not supported", "zypper (refused)"),
    ("Modules", "header", "not supported", "zypper (refused)"),
    ("OtherURLN", "header", "not supported", "zypper (refused); OtherURL1, OtherURL2, ..."),
    ("ConfURL", "header", "not supported", "zypper (refused)"),
    ("SetOpt", "header", "not supported", "yum (refused)"),
    ("Target", "header", "not supported", "not in Apptainer 1.3's parser (its "
     "validHeaders); accepted, used by no agent hpcimage has (buildkit is refused)"),
    ("Frontend", "header", "not supported", "as Target"),
    ("Filename", "header", "not supported", "as Target"),
    ("BuildArgs", "header", "not supported", "as Target"),
    ("%arguments", "section", "same", "defaults belong to their stage"),
    ("%pre", "section", "same", "on the host before the bootstrap agent, /bin/sh -ex"),
    ("%setup", "section", "same", ""),
    ("%files", "section", "differs", "`from STAGE`: links inside the stage are "
     "followed within its root, never into the build host"),
    ("%post", "section", "same", "`-c /bin/bash` as Apptainer"),
    ("%environment", "section", "same", ""),
    ("%runscript", "section", "same", "a leading `#!` line is kept as the interpreter"),
    ("%startscript", "section", "same", "a leading `#!` line is kept as the interpreter"),
    ("%test", "section", "same", "a leading `#!` line is kept as the interpreter"),
    ("%labels", "section", "same", "NAME VALUE, split at the first space"),
    ("%help", "section", "same", "stored verbatim"),
    ("%appinstall", "app", "same", ""),
    ("%apprun", "app", "same", "a leading `#!` line is kept as the interpreter"),
    ("%appenv", "app", "same", ""),
    ("%applabels", "app", "same", ""),
    ("%apphelp", "app", "same", ""),
    ("%appfiles", "app", "same", ""),
    ("%apptest", "app", "same", "a leading `#!` line is kept as the interpreter"),
    ("%appstart", "app", "same", "stored as /scif/apps/APP/scif/startscript; "
     "`instance start --app APP` starts it"),
)
HEADER_KEYS = tuple(k.lower() for k, kind, *_ in KEYWORDS
                    if kind == "header" and k != "OtherURLN")
SCRIPT_SECTIONS = ("pre", "setup", "post", "environment", "runscript", "startscript",
                   "test", "help")
SECTIONS = tuple(k[1:] for k, kind, *_ in KEYWORDS if kind == "section")
APP_SECTIONS = tuple(k[1:] for k, kind, *_ in KEYWORDS if kind == "app")
SHEBANG_SECTIONS = ("runscript", "startscript", "test")
AGENTS = ("localimage", "scratch", "busybox", "debootstrap", "docker", "docker-archive",
          "docker-daemon", "oci", "oci-archive", "oras", "library", "shub", "yum", "dnf",
          "zypper", "arch", "buildkit")

# ------------------------------------------------------------------------- syntax
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]*\Z")          # a stage or app name
ARG_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")             # a build argument's name
STAGE_RE = re.compile(r"^bootstrap:", re.I | re.M)                # All: (?mi)^bootstrap:
ARG_RE = re.compile(r"\{\{\s*(\w+)\s*\}\}", re.A)                 # buildArgsRegexp
COMMENT_RE = re.compile(r"#[^!]")                                 # commentLineRegexp
SECTION_RE = re.compile(r"\s*%+(\S*)(?:\s+(.*?))?\s*\Z", re.S)   # first word starts with %
HEADER_RE = re.compile(r"\s*([^:]*?)\s*:\s*(.*?)\s*\Z", re.S)    # doHeader: key, value
OTHERURL_RE = re.compile(r"otherurl[0-9]+\Z")                     # "otherurl&n"
FILES_RE = re.compile(r"""([^\s"']*{{\s*\w+\s*}}*[^\s{}"']*)+|([^\s"']+|"([^"]*)"|'([^']*)')""")
# (fileSplitter, but a single-quoted word ends at its closing quote: Apptainer's
# `'([^']*)` leaves it out and splits 'a b' into "'a b" and "'")


def valid_name(s):
    """A stage or app name: NAME_RE."""
    return NAME_RE.match(s) is not None


def valid_arg_name(s):
    """A build argument's name: ARG_NAME_RE."""
    return ARG_NAME_RE.match(s) is not None


def _section_match(ln):
    """A section line (SECTION_RE): (NAME lower-cased, ARGS or None), or None."""
    m = SECTION_RE.match(ln)
    return (m[1].lower(), m[2]) if m else None


def _header_match(ln):
    """`KEY: VALUE` (HEADER_RE), the line cut at `#`: (key, value), or None."""
    m = HEADER_RE.match(ln.split("#", 1)[0])
    return (m[1], m[2]) if m else None


def _known_key(k):
    """k (lower case) is a header keyword: one of HEADER_KEYS, or otherurlN."""
    return k in HEADER_KEYS or OTHERURL_RE.match(k) is not None


class Section:
    """One %section: its name, the text after the name (args), its body and lines."""

    __slots__ = ("name", "args", "body", "line", "raw")

    def __init__(self, name, args, body, line, raw=None):
        self.name, self.args, self.body, self.line = name, args, body, line
        self.raw = body if raw is None else raw     # as written, blank lines kept

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
    files, test, start)."""

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
        self.text = ""          # this stage's text after {{ }} substitution

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


def load(path, build_args=None, display=None, warn_unused=False):
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
    return parse(text, display or str(path), build_args, warn_unused)


def _err(display, line, msg):
    return UsageError(f"{display}:{line}: {msg}")


def parse(text, display="definition file", build_args=None, warn_unused=False):
    """Parse TEXT (named DISPLAY in errors) into a Definition, as Apptainer's parser
    does. BUILD_ARGS: {NAME: VALUE} from --build-arg; one that no stage uses is an error,
    or with WARN_UNUSED a warning."""
    text = text.replace("\r\n", "\n")
    if "\x00" in text:
        raise _err(display, text[:text.index("\x00")].count("\n") + 1, "NUL byte in the file")
    build_args = dict(build_args or {})
    for k in build_args:
        if not valid_arg_name(k):
            raise UsageError(f"--build-arg {k}: not a valid argument name")
    starts = [0] + [m.start() for m in STAGE_RE.finditer(text) if m.start()]
    chunks = [(text[a:b], text.count("\n", 0, a) + 1)
              for a, b in zip(starts, starts[1:] + [len(text)])]
    stages, used, values, out = [], set(), {}, []
    for chunk, first in chunks:
        sub, consumed = _substitute_stage(chunk, first, build_args, display)
        st = _parse_stage(sub, first, len(stages), display)
        out.append(sub)
        if st is None:
            continue
        used |= consumed
        values.update({k: build_args.get(k, st.arguments.get(k)) for k in consumed})
        stages.append(st)
    if not stages:
        raise _err(display, 1, "empty definition file: no header and no sections")
    unused = sorted(set(build_args) - used)
    if unused:
        msg = (f"--build-arg {', '.join(unused)}: not used by {display}")
        if not warn_unused:
            raise UsageError(msg + " (--warn-unused-build-args makes this a warning)")
        print(f"hpcimage: warning: {msg}", file=sys.stderr)
    names = {}
    for st in stages:
        if st.name:
            if st.name in names:
                raise _err(display, st.header_lines["stage"],
                           f"Stage: {st.name} used twice (also line {names[st.name]})")
            names[st.name] = st.header_lines["stage"]
    return Definition(display, "".join(out), stages, values)


def _arguments_of(chunk):
    """{NAME: default} of a stage's %arguments sections (Apptainer's ReadDefaults:
    NAME=VALUE lines, both trimmed; other lines are skipped)."""
    args, inside = {}, False
    for ln in chunk.split("\n"):
        m = _section_match(ln)
        if m:
            inside = m[0] == "arguments"
            continue
        s = ln.strip()
        if inside and s and not s.startswith("#") and "=" in s:
            k, _, v = s.partition("=")
            if k.strip():
                args[k.strip()] = v.strip()
    return args


def _substitute_stage(chunk, first, build_args, display):
    """CHUNK (a stage's text, its first line FIRST) with `{{ NAME }}` replaced as
    Apptainer's args.NewReader does; returns (text, the names used)."""
    if "{{" not in chunk:
        return chunk, set()
    defaults = _arguments_of(chunk)

    def value(name):
        if name in build_args:
            return build_args[name]
        return defaults.get(name)

    out, used, i = [], set(), 0
    for m in ARG_RE.finditer(chunk):
        start = max(chunk.rfind("\n", 0, m.start()), i)
        if COMMENT_RE.search(chunk, start, m.start()):
            continue
        name = m[1]
        v = value(name)
        if v is None:
            raise _err(display, first + chunk.count("\n", 0, m.start()),
                       f"{{{{ {name} }}}}: undefined build argument (define it in this "
                       f"stage's %arguments or pass --build-arg {name}=VALUE)")
        v = ARG_RE.sub(lambda n: n[0] if value(n[1]) is None else value(n[1]), v)
        out.append(chunk[i:m.start()])
        out.append(v)
        used.add(name)
        i = m.end()
    out.append(chunk[i:])
    return "".join(out), used


def _parse_stage(chunk, first, index, display):
    """One stage's text -> Stage, or None when it holds nothing (comments, blanks)."""
    lines = chunk.split("\n")
    if chunk.endswith("\n"):
        lines.pop()
    st = Stage(index, first)
    st.text = chunk
    n0 = None
    for i, ln in enumerate(lines):
        if _section_match(ln):
            n0 = i
            break
    header = lines if n0 is None else lines[:n0]
    _parse_header(st, header, first, display)
    if n0 is None:
        return st if st.header else None
    cur = None
    for i in range(n0, len(lines)):
        m = _section_match(lines[i])
        if m:
            if cur:
                _add_section(st, *cur, display)
            name, args = m
            if name not in SECTIONS and name not in APP_SECTIONS:
                raise _err(display, first + i, f"unknown section %{name} (sections: "
                           + ", ".join("%" + s for s in SECTIONS + APP_SECTIONS) + ")")
            cur = (name, args or "", first + i, [])
        else:
            cur[3].append(lines[i])
    _add_section(st, *cur, display)
    for app in st.apps.values():
        app.labels = _labels(app.sections["labels"].body.split("\n"), 0, display) \
            if "labels" in app.sections else {}
    return st


def _parse_header(st, lines, first, display):
    """Apptainer's doHeader: skip blank and `#` lines, cut at `#`, `key: value`;
    a value ending in `\\` goes on with the next line's (`\\n\\` puts a newline)."""
    cont = None             # (key, value so far, line)
    for n, ln in enumerate(lines, first):
        s = ln.strip()
        if not s or s.startswith("#"):
            if cont:
                _set_header(st, *cont, display)
                cont = None
            continue
        if cont:
            key, val, line = cont[0], cont[1] + s.split("#", 1)[0].strip(), cont[2]
            cont = None
        else:
            m = _header_match(s)
            if m is None:
                raise _err(display, n, f"expected 'Keyword: value' in the header, "
                           f"got {s!r}")
            (key, val), line = m, n
        if val.endswith("\\"):
            val = val[:-1]
            if val.endswith("\\n"):
                val = val[:-2] + "\n"
            cont = (key, val, line)
            continue
        _set_header(st, key, val, line, display)
    if cont:
        _set_header(st, *cont, display)


def _set_header(stage, key, value, line, display):
    k = key.lower()
    if not _known_key(k):
        raise _err(display, line, f"unknown header keyword {key!r} (known: "
                   + ", ".join(sorted(HEADER_KEYS)) + ", otherurlN)")
    if k == "stage" and not valid_name(value):
        raise _err(display, line, f"Stage: {value!r} is not a valid stage name")
    stage.header[k] = value        # a keyword given twice: the last one (as Apptainer)
    stage.header_lines[k] = line


def check(d):
    """What a build needs beyond the parser's: every stage a Bootstrap header with a
    known agent and its From:, `%files from` naming an earlier stage."""
    display = d.path
    for st in d.stages:
        if "bootstrap" not in st.header:
            raise _err(display, st.line, "no 'Bootstrap: AGENT' header: a stage to build "
                       "starts with one (e.g. Bootstrap: docker)")
        agent = st.bootstrap
        line = st.header_lines["bootstrap"]
        if agent not in AGENTS:
            raise _err(display, line, f"Bootstrap: unknown agent {st.get('bootstrap')!r} "
                       "(one of " + ", ".join(AGENTS) + ")")
        if agent not in ("scratch", "busybox", "debootstrap", "yum", "dnf", "zypper",
                         "arch", "buildkit") and not st.get("from"):
            raise _err(display, line, f"Bootstrap: {agent} needs a From: line")
        if agent == "debootstrap" and not st.get("osversion"):
            raise _err(display, line, "Bootstrap: debootstrap needs OSVersion: (e.g. bookworm)")
        if agent == "scratch" and st.get("from"):
            raise _err(display, st.header_lines["from"], "Bootstrap: scratch takes no From:")
        for frm, entries, fline in st.files:
            if frm is None:
                continue
            idx = next((s.index for s in d.stages if s.name == frm), None)
            if idx is None:
                raise _err(display, fline, f"%files from {frm}: no stage named {frm!r}")
            if idx >= st.index:
                raise _err(display, fline, f"%files from {frm}: stage {frm!r} must come "
                           "before the stage that copies from it")
    return d


def _trim_blank_end(lines):
    lines = list(lines)
    while lines and not lines[-1].strip():
        lines.pop()
    return lines


def _add_section(stage, name, args, line, body_lines, display):
    args = args.strip()
    raw = "\n".join(body_lines) + ("\n" if body_lines else "")
    first = line + 1
    if name in APP_SECTIONS:
        words = args.split()
        if not words:
            raise _err(display, line, f"%{name} needs an app name (%{name} NAME)")
        app_name = words[0]
        if not valid_name(app_name):
            raise _err(display, line, f"%{name} {args}: want one app name of letters, "
                       "digits, '_', '.', '+', '-'")
        app = stage.apps.get(app_name)
        if app is None:
            app = stage.apps[app_name] = App(app_name, line)
        short = name[3:]
        prev = app.sections.get(short)
        if prev is not None:         # Apptainer joins a repeated app section too
            raw = prev.raw + raw
            line = prev.line
        app.sections[short] = Section(name, args, _join(_trim_blank_end(raw.split("\n"))),
                                      line, raw)
        if short == "files":
            app.files += _file_entries(body_lines, first, display, name)
        return
    if name == "arguments":
        for n, ln in enumerate(body_lines, first):
            s = ln.strip()
            if not s or s.startswith("#"):
                continue
            k, eq, v = s.partition("=")
            if not eq:                  # Apptainer's ReadDefaults: a warning, skipped
                print(f"hpcimage: warning: {display}:{n}: %arguments: {s!r} is not "
                      "NAME=VALUE: skipped", file=sys.stderr)
                continue
            if not k.strip():
                raise _err(display, n, f"%arguments: want NAME=VALUE, got {s!r}")
            stage.arguments[k.strip()] = v.strip()
        return
    if name == "files":
        frm = None
        a = args.split()
        if a:
            if len(a) < 2 or a[0] != "from":
                raise _err(display, line, f"%files {args}: want '%files' or "
                           "'%files from STAGE'")
            frm = a[1]
        stage.files.append((frm, _file_entries(body_lines, first, display, name), line))
        return
    if name == "labels":
        stage.labels.update(_labels(body_lines, first, display))
        return
    if name in ("post", "setup", "pre", "test", "runscript", "startscript"):
        _script_args(args, line, display, name)
    prev = stage.sections.get(name)
    if prev is not None:
        # a repeated section: its parts joined as written, the blank lines between
        # them kept; its arguments the last part's (Apptainer's parseTokenSection)
        raw = prev.raw + raw
        line, args = prev.line, args or prev.args
    stage.sections[name] = Section(name, args, _join(_trim_blank_end(raw.split("\n"))),
                                   line, raw)


def _join(lines):
    return "\n".join(lines) + ("\n" if lines else "")


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


def shebang_script(section):
    """The file Apptainer writes for a %runscript, %startscript or %test section (its
    handleShebangScript): the section's own `#!` line as the interpreter when its text
    starts with one, else `#!/bin/sh`; the section's arguments after it (an app
    section's argument is its app's name: none)."""
    body = section.body
    shebang = "#!/bin/sh"
    if body.strip().startswith("#!"):
        first, _, body = body.lstrip().partition("\n")
        shebang = first.strip()
    args = "" if section.name in APP_SECTIONS else section.args.split("#")[0].strip()
    if args:
        shebang += " " + args
    return f"{shebang}\n\n{body}"


def _file_entries(body_lines, first, display, name):
    """SRC [DST] lines as Apptainer splits them (its fileSplitter; only the first two
    words count, double quotes trimmed)."""
    out = []
    for n, ln in enumerate(body_lines, first):
        s = ln.strip()
        if not s or s.startswith("#"):
            continue
        if name == "appfiles":              # apps.copyFiles: cut at '#', split at ' '
            words = s.split("#")[0].strip().split(" ", 1)
            words = [w.strip() for w in words]
        else:
            words = [_unquote(m[0].strip()) for m in FILES_RE.finditer(s)]
        if not words or not words[0]:
            continue
        out.append(FileEntry(words[0], words[1] if len(words) > 1 and words[1] else None, n))
    return out


def _unquote(w):
    if len(w) >= 2 and w[0] == w[-1] == "'":
        return w[1:-1]
    return w.strip('"')


def _labels(body_lines, first, display):
    """%labels lines as Apptainer's GetLabels splits them: at the first space (a tab
    is part of the name), both sides trimmed; blank and `#` lines skipped."""
    labels = {}
    for ln in body_lines:
        s = ln.strip()
        if not s or s.startswith("#"):
            continue
        k, _, v = s.partition(" ")
        labels[k.strip()] = v.strip()
    return labels
