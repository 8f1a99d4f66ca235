"""The definition-file parser (hpcimage.imagebuild.deffile): header, every section, SCI-F apps,
multi-stage builds, {{ arguments }}, real-world files, and line-numbered errors."""
import glob
import os
import textwrap
from pathlib import Path

import pytest

from hpcimage.imagebuild import deffile
from hpcimage.errors import UsageError

from conftest import TESTDATA

REPO = Path(__file__).resolve().parents[1]


def parse(text, **kw):
    return deffile.parse(textwrap.dedent(text).lstrip("\n"), "t.def", **kw)


def test_header_and_every_section():
    d = parse("""
        # a comment
        Bootstrap: debootstrap
        OSVersion: bookworm
        MirrorURL: http://deb.debian.org/debian
        Include: less, vim-tiny

        %setup
            touch $HPCIMAGE_ROOTFS/x
        %files
            a.txt /opt/a.txt
            "with space.txt"
        %post -c /bin/bash
            apt-get update
            printf '%s\\n' ok
        %environment
            export A=1
        %runscript
            exec echo "$@"
        %startscript
            echo start
        %test
            true
        %labels
            Author me@example.org
            Version 1.0
        %help
            Some help.
        """)
    st, = d.stages
    assert st.bootstrap == "debootstrap"
    assert st.get("OSVersion") == "bookworm" and st.get("include") == "less, vim-tiny"
    assert st.get("mirrorurl") == "http://deb.debian.org/debian"
    assert "touch $HPCIMAGE_ROOTFS/x" in st.script("setup")
    (frm, entries, line), = st.files
    assert frm is None and line == 9
    assert [(e.src, e.dst, e.line) for e in entries] == [
        ("a.txt", "/opt/a.txt", 10), ("with space.txt", None, 11)]
    assert "printf '%s\\n' ok" in st.script("post")      # a % line inside a script
    assert st.sections["post"].args == "-c /bin/bash"
    assert st.script("environment").strip() == "export A=1"
    assert st.labels == {"Author": "me@example.org", "Version": "1.0"}
    assert st.script("help").strip() == "Some help."
    for s in ("runscript", "startscript", "test"):
        assert st.script(s)


def test_apps():
    d = parse("""
        Bootstrap: busybox
        %appinstall foo
            echo install
        %apprun foo
            echo run
        %appenv foo
            export FOO=1
        %applabels foo
            Flavor sweet
        %apphelp foo
            foo help
        %appfiles foo
            src.txt bin/
        %apptest foo
            true
        %apprun bar
            echo bar
        """)
    st = d.final
    assert list(st.apps) == ["foo", "bar"]
    foo = st.apps["foo"]
    assert set(foo.sections) == {"install", "run", "env", "labels", "help", "files", "test"}
    assert foo.labels == {"Flavor": "sweet"}
    assert [(e.src, e.dst) for e in foo.files] == [("src.txt", "bin/")]
    assert st.apps["bar"].script("run").strip() == "echo bar"


def test_multi_stage_and_files_from():
    d = parse("""
        Bootstrap: docker
        From: golang:1.21
        Stage: build

        %post
            go build -o /app ./...

        Bootstrap: docker
        From: alpine:3.19
        Stage: final

        %files from build
            /app /usr/local/bin/app
        """)
    assert [s.name for s in d.stages] == ["build", "final"]
    assert d.final.files[0][0] == "build"
    assert d.stage_named("build").get("from") == "golang:1.21"


def test_arguments_and_build_args():
    text = """
        Bootstrap: docker
        From: ubuntu:{{ VERSION }}

        %arguments
            VERSION=22.04
            GREETING="hello there"

        %post
            echo {{GREETING}} > /greeting
        """
    d = parse(text)
    assert d.final.get("from") == "ubuntu:22.04"
    # Apptainer's getKeyVal keeps the quotes: the shell reads them
    assert 'echo "hello there" > /greeting' in d.final.script("post")
    d = parse(text, build_args={"VERSION": "24.04"})
    assert d.final.get("from") == "ubuntu:24.04"
    assert "From: ubuntu:24.04" in d.text


def check(text):
    return deffile.check(deffile.parse(text, "t.def"))


@pytest.mark.parametrize("text, line, what", [
    ("From: x\n", 1, "no 'Bootstrap: AGENT' header"),
    ("%post\n  true\n", 1, "no 'Bootstrap: AGENT' header"),
    ("Bootstrap: busybox\nFrobnicate: 1\n", 2, "unknown header keyword 'Frobnicate'"),
    ("Bootstrap: busybox\nOtherURL: x\n", 2, "unknown header keyword 'OtherURL'"),
    ("Bootstrap: nosuch\n", 1, "unknown agent"),
    ("Bootstrap: docker\n", 1, "needs a From:"),
    ("Bootstrap: docker # no From\n", 1, "needs a From:"),
    ("Bootstrap: debootstrap\n", 1, "needs OSVersion"),
    ("Bootstrap: scratch\nFrom: x\n", 2, "takes no From:"),
    ("Bootstrap: busybox\n\n%frobnicate\n", 3, "unknown section %frobnicate"),
    ("Bootstrap: busybox\n%labels\n  a b\n%frobnicate\n", 4, "unknown section %frobnicate"),
    # a misspelt header after a script section is not script text (issue 12)
    ("Bootstrap: busybox\n%runscript\n  echo hi\n%hlep\n  Usage: x\n", 4,
     "unknown section %hlep"),
    ("Bootstrap: busybox\n%post\n  true\n\n%enviroment\n  X=1\n", 5,
     "unknown section %enviroment"),
    ("Bootstrap: busybox\n%appinstall a\n  true\n%apprnu a\n", 4, "unknown section %apprnu"),
    ("Bootstrap: busybox\n%test\n  true\n%post: true\n", 4, "unknown section %post:"),
    ("Bootstrap: busybox\n%setup\n  true\n%Hlep\n", 4, "unknown section %hlep"),
    # an indented %word and a bare % word start a section, as in Apptainer (issue 14)
    ("Bootstrap: busybox\n%runscript\n  echo hi\n    %notasection\n", 4,
     "unknown section %notasection"),
    ("Bootstrap: busybox\n%runscript\n  echo hi\n%% literal\n", 4, "unknown section %"),
    ("Bootstrap: busybox\n%runscript\n  echo hi\n% spaced\n", 4, "unknown section %"),
    ("Bootstrap: busybox\n%apprun\n  true\n", 2, "needs an app name"),
    ("Bootstrap: busybox\n%apprun -x\n", 2, "want one app name"),
    ("Bootstrap: busybox\n%files from nowhere\n  a b\n", 2, "no stage named 'nowhere'"),
    ("Bootstrap: busybox\nStage: b\n%files from b\n  a b\n", 3, "must come before"),
    ("Bootstrap: busybox\n%files into x\n", 2, "want '%files' or '%files from STAGE'"),
    ("Bootstrap: busybox\n%post\n  echo {{ NOPE }}\n", 3, "{{ NOPE }}: undefined build argument"),
    ("Bootstrap: busybox\n%arguments\n  =1\n", 3, "want NAME=VALUE"),
    ("Bootstrap: busybox\nthis is not a header\n", 2, "expected 'Keyword: value'"),
    ("Bootstrap: busybox\nStage: a b\n", 2, "not a valid stage name"),
    ("", 1, "empty definition file"),
    ("# only a comment\n", 1, "empty definition file"),
    ("Bootstrap: busybox\nStage: a\n\nBootstrap: busybox\nStage: a\n", 5, "used twice"),
    ("Bootstrap: busybox\n%post -c\n", 2, "missing the interpreter"),
])
def test_errors_name_file_and_line(text, line, what):
    with pytest.raises(UsageError) as e:
        check(text)
    assert e.value.status == 2
    assert e.value.message.startswith(f"t.def:{line}: "), e.value.message
    assert what in e.value.message


def test_load_errors(tmp_path):
    with pytest.raises(UsageError, match="no such definition file"):
        deffile.load(tmp_path / "missing.def")
    p = tmp_path / "bin.def"
    p.write_bytes(b"Bootstrap: busybox\n%post\n  echo \xff\n")
    with pytest.raises(UsageError, match=r"bin.def:3: not UTF-8"):
        deffile.load(p)


def test_script_argv():
    d = parse("""
        Bootstrap: busybox
        %post -c /bin/bash -l
            true
        %test
            true
        """)
    assert deffile.script_argv(d.final.sections["post"], "/.post.script") == \
        ["/bin/sh", "-ex", "-c", "/bin/bash -l /.post.script"]
    assert deffile.script_argv(d.final.sections["test"], "/t") == ["/bin/sh", "-ex", "/t"]


# ------------------------------------------------- issue 14: the parser as Apptainer's

def test_header_comments_and_continuation():
    """Header lines are cut at `#` (a comment after the agent was refused, one after
    From: went into the value); a value ending in `\\` goes on on the next line."""
    d = check(textwrap.dedent("""\
        # before the header
        Bootstrap: busybox  # comment
        """))
    assert d.final.bootstrap == "busybox"
    d = check("Bootstrap: docker\nFrom: alpine:3 # pinned\n")
    assert d.final.get("from") == "alpine:3"
    d = check("Bootstrap: debootstrap\nOSVersion: bookworm\nInclude: less, \\\n"
              "   vim-tiny, \\\n  curl\nMirrorURL: http://deb.debian.org/debian\n")
    assert d.final.get("include") == "less, vim-tiny, curl"
    assert d.final.get("mirrorurl") == "http://deb.debian.org/debian"
    # a keyword given twice: the last one, as Apptainer's doHeader
    assert check("Bootstrap: docker\nFrom: a\nFrom: b\n").final.get("from") == "b"


def test_crlf_and_indented_sections():
    d = check("Bootstrap: busybox\r\n%post\r\n  echo a\r\n  %environment\r\n"
              "  export X=1\r\n\t%runscript\r\n  echo run\r\n")
    st = d.final
    assert st.script("post") == "  echo a\n"
    assert st.script("environment") == "  export X=1\n"
    assert st.script("runscript") == "  echo run\n"
    assert "\r" not in d.text


def test_every_keyword_apptainer_accepts():
    """Every header keyword and section of Apptainer's parser (KEYWORDS) parses."""
    header = "".join(f"{k if k != 'OtherURLN' else 'OtherURL2'}: v\n"
                     for k, kind, *_ in deffile.KEYWORDS
                     if kind == "header" and k not in ("Bootstrap", "Stage"))
    body = "".join(f"{k} {'app1' if kind == 'app' else ''}\n    echo {k}\n"
                   for k, kind, *_ in deffile.KEYWORDS if kind != "header" and
                   k not in ("%files", "%labels", "%arguments", "%appfiles", "%applabels"))
    d = deffile.parse("Bootstrap: busybox\nStage: s\n" + header + body, "t.def")
    st = d.final
    for k, kind, *_ in deffile.KEYWORDS:
        if kind == "header":
            assert st.get("otherurl2" if k == "OtherURLN" else k) is not None, k
        elif kind == "section" and k not in ("%files", "%labels", "%arguments"):
            assert st.script(k[1:]) == f"    echo {k}\n", k
        elif kind == "app" and k not in ("%appfiles", "%applabels"):
            assert st.apps["app1"].script(k[4:]) == f"    echo {k}\n", k
    assert st.sections["pre"].body and st.apps["app1"].script("start")


def test_build_arguments_belong_to_their_stage():
    """%arguments defaults are their stage's; a placeholder in a stage that does not
    define it is an error (Apptainer's build-args test data); comment lines keep
    their placeholders; text that is not a build argument is left alone."""
    two = textwrap.dedent("""\
        Bootstrap: docker
        From: alpine:3.19
        Stage: one
        %arguments
            HOME=/root
        %post
            cd {{ HOME }}
        Bootstrap: docker
        From: alpine:3.19
        %files from one
            {{ HOME }}/x /x
        """)
    with pytest.raises(UsageError, match=r"t.def:11: \{\{ HOME \}\}: undefined build"):
        deffile.parse(two, "t.def")
    d = deffile.parse(two, "t.def", {"HOME": "/home/u"})
    assert d.stages[0].script("post") == "    cd /home/u\n"
    assert d.final.files[0][1][0].src == "/home/u/x"
    d = parse("""
        Bootstrap: busybox
        %arguments
            A=1
            B={{ A }}-b
        %post
            # echo {{ UNDEFINED }} in a comment is not replaced
            echo {{ B }} # and {{ UNDEFINED }} after a comment neither
            docker inspect -f '{{.Id}}' x; echo '{{ }}' '{{ a-b }}'
            #!{{ A }} is no comment
        """)
    post = d.final.script("post")
    assert "# echo {{ UNDEFINED }} in a comment" in post
    assert "echo 1-b # and {{ UNDEFINED }} after" in post
    assert "-f '{{.Id}}' x; echo '{{ }}' '{{ a-b }}'" in post
    assert "#!1 is no comment" in post


def test_arguments_line_without_value_warns(capsys):
    d = deffile.parse("Bootstrap: busybox\n%arguments\n  A=1\n  not an assignment\n", "t.def")
    assert d.final.arguments == {"A": "1"}
    assert "warning: t.def:4: %arguments: 'not an assignment' is not NAME=VALUE" in \
        capsys.readouterr().err


def test_unused_build_arg(capsys):
    text = "Bootstrap: busybox\n%post\n  true\n"
    with pytest.raises(UsageError, match=r"--build-arg X, Y: not used by t.def "
                                         r"\(--warn-unused-build-args"):
        deffile.parse(text, "t.def", {"Y": "1", "X": "2"})
    deffile.parse(text, "t.def", {"X": "2"}, warn_unused=True)
    assert "warning: --build-arg X: not used by t.def" in capsys.readouterr().err


def test_labels_split_as_apptainer():
    d = parse("""
        Bootstrap: busybox
        %labels
            Author  Ann Maintainer <a@example.org>
            Key\tvalue with tab
            version=1.0
            Quoted "a b"
            Lonely
            # a comment
        """)
    assert d.final.labels == {"Author": "Ann Maintainer <a@example.org>",
                              "Key\tvalue": "with tab", "version=1.0": "",
                              "Quoted": '"a b"', "Lonely": ""}


def test_repeated_section_keeps_the_blank_line_between_its_parts():
    d = parse("""
        Bootstrap: busybox
        %post
            echo one

        %runscript
            echo run
        %post -c /bin/bash
            echo two
        """)
    assert d.final.script("post") == "    echo one\n\n    echo two\n"
    assert d.final.sections["post"].args == "-c /bin/bash"


def test_help_is_stored_verbatim():
    d = deffile.parse("Bootstrap: busybox\n%help\n    Usage: x\n\tTabbed\n  two\n\n", "t.def")
    assert d.final.script("help") == "    Usage: x\n\tTabbed\n  two\n"


@pytest.mark.parametrize("section, args, body, want", [
    ("runscript", "", "  echo hi\n", "#!/bin/sh\n\n  echo hi\n"),
    ("runscript", "", "#!/usr/bin/awk -f\nBEGIN { print 1 }\n",
     "#!/usr/bin/awk -f\n\nBEGIN { print 1 }\n"),
    ("test", "", "  #!/bin/bash\necho $0\n", "#!/bin/bash\n\necho $0\n"),
    ("startscript", "-e # comment", "true\n", "#!/bin/sh -e\n\ntrue\n"),
    ("apprun", "foo", "  echo foo\n", "#!/bin/sh\n\n  echo foo\n"),
    ("apptest", "foo", "#!/bin/bash\ntrue\n", "#!/bin/bash\n\ntrue\n"),
])
def test_shebang_script(section, args, body, want):
    d = deffile.parse(f"Bootstrap: busybox\n%{section} {args}\n{body}", "t.def")
    st = d.final
    sec = st.apps["foo"].sections[section[3:]] if section.startswith("app") else \
        st.sections[section]
    assert deffile.shebang_script(sec) == want


def test_files_words_as_apptainer_splits_them():
    d = parse("""
        Bootstrap: busybox
        %files
            "a b" 'c d'
            src dst ignored words
            {{ D }}/x
            'single quoted'
        %arguments
            D=/data
        """)
    assert [(e.src, e.dst) for e in d.final.files[0][1]] == [
        ("a b", "c d"), ("src", "dst"), ("/data/x", None), ("single quoted", None)]


def test_site_images_parse():
    files = sorted(glob.glob(str(REPO / "images" / "*.def")))
    names = {os.path.basename(f) for f in files}
    assert {"Demo.def", "Debian-12.def", "CentOS-7.def", "Rocky-8.def", "Ubuntu-16.04.def",
            "Ubuntu-22.04.def", "Fedora-39.def"} <= names
    for f in files:
        d = deffile.load(f)
        assert d.final.bootstrap in ("busybox", "debootstrap", "docker"), f
        if d.final.bootstrap == "docker":
            from hpcimage.imagebuild.registry import Reference
            ref = Reference.parse(d.final.get("from"))
            assert ref.registry == "registry-1.docker.io"


REAL_WORLD = [
    # Apptainer's documentation example (lolcow), with an indented header.
    """
    BootStrap: docker
    From: ubuntu:16.04

    %post
        apt-get -y update
        apt-get -y install fortune cowsay lolcat

    %environment
        export LC_ALL=C
        export PATH=/usr/games:$PATH

    %runscript
        fortune | cowsay | lolcat

    %labels
        Author GodloveD
    """,
    # A SCI-F recipe from the SCIF examples.
    """
    Bootstrap: docker
    From: continuumio/miniconda3

    %environment
    DEBIAN_FRONTEND=noninteractive
    export DEBIAN_FRONTEND

    %appinstall fortune
        apt-get update && apt-get install -y fortune
    %apphelp fortune
       fortune is the best app
    %apprun fortune
       /usr/games/fortune "$@"
    %applabels fortune
       BESTAPP=fortune
    %appenv fortune
        BESTAPP=fortune
        export BESTAPP
    """,
    # A CentOS build with yum and a library install.
    """
    Bootstrap: docker
    From: centos:7
    Registry: docker.io
    Namespace: library

    %files
        ./apps_recipes/bwa.scif /opt

    %post
        yum -y groupinstall "Development Tools"
        echo 'export PATH=${PATH}:/scif/apps/bwa/bin' >> $SINGULARITY_ENVIRONMENT

    %runscript
        exec scif "$@"
    """,
    # Multi-stage with a SIF from a previous stage's files and an OCI archive.
    """
    Bootstrap: oci-archive
    From: ./image.tar:latest
    Stage: one

    %post
        make -C /src

    Bootstrap: localimage
    From: base.sif

    %files from one
        /src/bin/* /usr/local/bin/
    """,
]


@pytest.mark.parametrize("text", REAL_WORLD)
def test_real_world(text):
    d = parse(text)
    assert d.final.bootstrap



# -------------------------------- Apptainer's parser test data and real-world files

PARSER = TESTDATA / "apptainer" / "parser"
REALWORLD = TESTDATA / "realworld-defs"
needs_parser_data = pytest.mark.skipif(not PARSER.is_dir(),
                                       reason=f"no Apptainer parser test data ({PARSER})")
needs_realworld = pytest.mark.skipif(not REALWORLD.is_dir(),
                                     reason=f"no real-world definition files ({REALWORLD})")
# Exclusions (docs/apptainer.md, parser-exclusions): none; every good, multi and
# bad file is compared.


def _norm(s):
    """A script's meaning: its text without the blank lines that end it (Apptainer keeps
    those that separate it from the next section; the JSON trims the first one's)."""
    lines = (s or "").split("\n")
    while lines and not lines[-1].strip():
        lines.pop()
    return "\n".join(lines)


_IMAGE = {"help": "help", "environment": "environment", "runScript": "runscript",
          "test": "test", "startScript": "startscript"}
_BUILD = {"pre": "pre", "setup": "setup", "post": "post", "test": "test"}


def _theirs(j):
    """What Apptainer's JSON means: header, labels, scripts (text, args), %files
    (merged by their arguments, as Apptainer merges them), app sections, app order."""
    out = {"header": j.get("header") or {}, "labels": j["imageData"]["labels"] or {}}
    for k, v in _IMAGE.items():
        s = j["imageData"]["imageScripts"][k]
        out[v] = (_norm(s["script"]), (s["args"] or "").strip())
    for k, v in _BUILD.items():
        s = j["buildData"]["buildScripts"][k]
        out[v] = (_norm(s["script"]), (s["args"] or "").strip())
    out["files"] = [(" ".join(f["args"].split()),
                     [(e["source"], e["destination"]) for e in f["files"] or []])
                    for f in j["buildData"]["files"] or []]
    out["apps"] = {k: _norm(v) for k, v in (j.get("customData") or {}).items()}
    out["order"] = j.get("appOrder") or []
    return out


def _ours(st):
    out = {"header": dict(st.header), "labels": dict(st.labels)}
    for v in set(_IMAGE.values()) | set(_BUILD.values()):
        s = st.sections.get(v)
        out[v] = (_norm(s.body if s else ""), s.args if s else "")
    merged = {}
    for frm, entries, _ in st.files:
        merged.setdefault("" if frm is None else f"from {frm}", []).extend(
            (e.src, e.dst or "") for e in entries)
    out["files"] = list(merged.items())
    out["apps"] = {f"app{k} {a.name}": _norm(s.body)
                   for a in st.apps.values() for k, s in a.sections.items()}
    out["order"] = list(st.apps)
    return out


def _good_files():
    if not PARSER.is_dir():
        return []
    return sorted(str(p.relative_to(PARSER)) for d in ("testdata_good", "testdata_multi")
                  for p in (PARSER / d).rglob("*.json") if not p.name.endswith("_sections.json"))


@needs_parser_data
@pytest.mark.parametrize("rel", _good_files() or ["none"])
def test_apptainer_good_files_mean_what_apptainer_parsed(rel):
    import json
    j = json.loads((PARSER / rel).read_text())
    d = deffile.load(PARSER / rel[:-len(".json")])
    theirs = [_theirs(x) for x in (j if isinstance(j, list) else [j])]
    assert [_ours(st) for st in d.stages] == theirs


@needs_parser_data
def test_apptainer_data_is_all_there():
    assert len(_good_files()) == 27
    assert sorted(p.name for p in (PARSER / "testdata_bad").iterdir()) == [
        "bad_section", "empty", "emptycomments", "json_input_1", "json_input_2"]


@needs_parser_data
@pytest.mark.parametrize("name, what", [
    ("bad_section", "bad_section:3: unknown section %badsection"),
    ("empty", "empty:1: empty definition file"),
    ("emptycomments", "emptycomments:1: empty definition file"),
    ("json_input_1", "json_input_1:1: unknown header keyword '{\"rawDefFile\"'"),
    ("json_input_2", "json_input_2:1: unknown header keyword '{\"rawDefFile\"'"),
])
def test_apptainer_bad_files_are_refused(name, what):
    with pytest.raises(UsageError) as e:
        deffile.load(PARSER / "testdata_bad" / name)
    assert e.value.status == 2
    assert what in e.value.message


@needs_parser_data
def test_apptainer_build_args_files():
    b = PARSER / "build-args"
    # the final stage uses {{ HOME }} that only the first stage's %arguments define
    with pytest.raises(UsageError, match=r"multiple-stage.def:32: \{\{ HOME \}\}"):
        deffile.load(b / "multiple-stage.def", {"DEVEL_IMAGE": "alpine:3.16"})
    d = deffile.load(b / "multiple-stage-unit-test.def", {"DEVEL_IMAGE": "alpine:3.16"})
    assert [s.get("from") for s in d.stages] == ["alpine:3.16", "alpine:3.17"]
    assert [(e.src, e.dst) for e in d.final.files[0][1]] == [("/root/hello.sh", "/bin/hello")]
    with pytest.raises(UsageError, match=r"\{\{ DEVEL_IMAGE \}\}: undefined"):
        deffile.load(b / "multiple-stage-unit-test.def")
    d = deffile.load(b / "single-stage-unit-test.def")
    st = d.final
    assert st.get("from") == "alpine:3.17" and st.labels == {"Author": "jason"}
    assert st.script("environment") == "    export OS_VER=3.17\n"
    assert st.script("help") == "    This is a demo for templating definition file\n"
    d = deffile.load(b / "single-stage.def", {"IMAGE": "base.sif", "SCRIPT_PATH": "s.sh",
                                              "AUTHOR": "me"})
    assert d.final.get("from") == "base.sif" and d.final.labels["Author"] == "me"
    assert [e.src for e in d.final.files[0][1]] == ["s.sh"]
    assert "touch ${APPTAINER_ROOTFS}/tmpfile" in d.final.script("setup")


_REALWORLD_ARGS = {"11-csc-lumi-base-buildarg.def": {"install_slurm": "false"},
                   "13-foam-com-openfoam.def": {"BASE_CONTAINER": "base.sif"},
                   "18-gcp-openradioss-oras.def": {
                       k: "x" for k in ("LOCATION", "PROJECT_ID", "REPO",
                                        "OMPI4_PMIX_VERSION", "OPENRADIOSS_VERSION")}}


def _realworld():
    return sorted(p.name for p in REALWORLD.glob("*.def")) if REALWORLD.is_dir() else []


@needs_realworld
def test_realworld_all_37():
    assert len(_realworld()) == 37


@needs_realworld
@pytest.mark.parametrize("name", _realworld() or ["none"])
def test_realworld_parses(name):
    """Apptainer accepts each of them: hpcimage's parser too, every stage with a known
    agent and its From: (deffile.check)."""
    d = deffile.load(REALWORLD / name, _REALWORLD_ARGS.get(name), warn_unused=True)
    deffile.check(d)
    assert d.final.bootstrap in deffile.AGENTS


@needs_realworld
def test_realworld_notable_syntax():
    def load(name):
        return deffile.load(REALWORLD / name, _REALWORLD_ARGS.get(name), warn_unused=True)
    d = load("06-csc-qiskit-crlf.def")                  # CRLF throughout
    assert "\r" not in d.text and all("\r" not in s.body for s in d.final.sections.values())
    d = load("34-nih-cutadapt-crlf-pre.def")            # CRLF and %pre
    assert d.final.bootstrap == "library" and d.final.script("pre")
    d = load("29-apptainer-docker-hdrcomment.def")      # From: busybox:latest   # comment
    assert d.final.get("from") == "busybox:latest"
    d = load("30-apptainer-instances-appstart.def")     # %appstart foo
    assert d.final.apps["foo"].script("start")
    d = load("01-chtc-multi-node.def")                  # two stages, %files from build
    assert [s.name for s in d.stages] == ["build", "final"]
    assert d.final.files[0][0] == "build"
    d = load("35-nih-delly-multistage.def")
    assert len(d.stages) == 2 and any(f[0] for f in d.final.files)
    d = load("36-nih-eager-labeltabs.def")              # Key<TAB>value labels
    assert any("\t" in k for k in d.final.labels)
    d = load("09-csc-ompi-tabs.def")                    # %environment right after %post
    assert d.final.script("environment") and d.final.script("post")
    d = load("31-apptainer-apps-cowsay.def")            # three SCI-F apps
    assert len(d.final.apps) == 3
    assert all(a.script("run") for a in d.final.apps.values())
    d = load("07-csc-qiskit-apps.def")                  # an app without %appinstall
    assert "pip" in d.final.apps
    d = load("18-gcp-openradioss-oras.def")             # header-only first stage, 2x %post
    assert len(d.stages) == 2 and not d.stages[0].sections
    d = load("37-nih-taiji-headeronly.def")             # header only, lower-case keys
    assert d.final.bootstrap == "localimage" and not d.final.sections
    d = load("28-mitll-core.def")                       # `# From:` inside the header
    assert d.final.get("from")
    d = load("32-apptainer-rocky-yum.def")              # %{OSVERSION} in MirrorURL
    assert "%{OSVERSION}" in d.final.get("mirrorurl")


# ------------------------------------------ docs/apptainer.md's table is this table

def test_docs_deffile_table_matches_the_keyword_table():
    text = (REPO / "docs" / "apptainer.md").read_text()
    start = text.index("<!-- section: deffile")
    end = text.index("<!-- section:", start + 1)
    rows = {}
    for ln in text[start:end].splitlines():
        cells = [c.strip() for c in ln.strip().strip("|").split("|")]
        if ln.startswith("| `") and len(cells) >= 3:
            rows[cells[0].strip("`")] = cells[1]
    want = {k: status for k, _, status, _ in deffile.KEYWORDS}
    assert rows == want
