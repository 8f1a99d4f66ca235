"""The definition-file parser (hpcimage.imagebuild.deffile): header, every section, SCI-F apps,
multi-stage builds, {{ arguments }}, real-world files, and line-numbered errors."""
import glob
import os
import textwrap
from pathlib import Path

import pytest

from hpcimage.imagebuild import deffile
from hpcimage.errors import UsageError

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
    assert "echo hello there > /greeting" in d.final.script("post")
    d = parse(text, build_args={"VERSION": "24.04"})
    assert d.final.get("from") == "ubuntu:24.04"
    assert "From: ubuntu:24.04" in d.text


@pytest.mark.parametrize("text, line, what", [
    ("From: x\n", 1, "first header keyword must be Bootstrap"),
    ("Bootstrap: busybox\nFrobnicate: 1\n", 2, "unknown header keyword 'Frobnicate'"),
    ("Bootstrap: nosuch\n", 1, "unknown agent"),
    ("Bootstrap: docker\n", 1, "needs a From:"),
    ("Bootstrap: debootstrap\n", 1, "needs OSVersion"),
    ("Bootstrap: busybox\nBootstrap: docker\nFrom: x\nFrom: y\n", 4, "given twice"),
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
    ("Bootstrap: busybox\n%apprun\n  true\n", 2, "needs an app name"),
    ("Bootstrap: busybox\n%apprun a b\n", 2, "want one app name"),
    ("Bootstrap: busybox\n%files from nowhere\n  a b\n", 2, "no stage named 'nowhere'"),
    ("Bootstrap: busybox\n%files into x\n", 2, "want '%files' or '%files from STAGE'"),
    ("Bootstrap: busybox\n%files\n  a b c\n", 3, "want 'SRC [DST]'"),
    ("Bootstrap: busybox\n%files\n  'a b\n", 3, "No closing quotation"),
    ("Bootstrap: busybox\n%post\n  echo {{ NOPE }}\n", 3, "{{ NOPE }}: undefined build argument"),
    ("Bootstrap: busybox\n%arguments\n  not an assignment\n", 3, "want NAME=VALUE"),
    ("Bootstrap: busybox\nthis is not a header\n", 2, "expected 'Keyword: value'"),
    ("%post\n  true\n", 1, "before any header"),
    ("", 1, "empty definition file"),
    ("# only a comment\n", 1, "empty definition file"),
    ("Bootstrap: busybox\nStage: a\n\nBootstrap: busybox\nStage: a\n", 5, "used twice"),
    ("Bootstrap: busybox\n%post -c\n", 2, "missing the interpreter"),
    ("Bootstrap: busybox\n%apprun x\n  a\n%apprun x\n  b\n", 4, "given twice"),
])
def test_errors_name_file_and_line(text, line, what):
    with pytest.raises(UsageError) as e:
        deffile.parse(text, "t.def")
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


# ------------------------------------------- the syntax, on random input

def _reference():
    """The syntax's regular expressions as the tests state them (hpcimage.deffile has
    them beside Apptainer's parser); the parser's matching must agree with them."""
    import re
    return {
        "name": lambda s: bool(re.match(r"[A-Za-z0-9][A-Za-z0-9_.+-]*\Z", s)),
        "arg_name": lambda s: bool(re.match(r"[A-Za-z_][A-Za-z0-9_]*\Z", s)),
        "section": lambda s: (lambda m: m and (m.group(1), m.group(2)))(
            re.match(r"%([A-Za-z]+)(?:[ \t]+(.*?))?[ \t]*\Z", s)),
        "header": lambda s: (lambda m: m and (m.group(1), m.group(2)))(
            re.match(r"\s*([A-Za-z][A-Za-z0-9]*)\s*:\s*(.*?)\s*\Z", s)),
        "subst": lambda s: re.sub(r"\{\{\s*([A-Za-z0-9_.\-]*)\s*\}\}",
                                  lambda m: f"<{m.group(1)}>", s),
    }


def _random_lines(seed, n=4000):
    import random
    rnd = random.Random(seed)
    alphabet = list("aZ9_.+-%:{} \t#\r\x0b\x0c\u00a0\u2028é0x") + ["{{", "}}", "%post", " : "]
    for _ in range(n):
        yield "".join(rnd.choice(alphabet) for _ in range(rnd.randrange(0, 14)))


def test_matching_agrees_with_the_regular_expressions():
    ref = _reference()
    for ln in _random_lines(7):
        assert deffile.valid_name(ln) == ref["name"](ln), repr(ln)
        assert deffile.valid_arg_name(ln) == ref["arg_name"](ln), repr(ln)
        assert (deffile._section_match(ln) or None) == (ref["section"](ln) or None), repr(ln)
        assert (deffile._header_match(ln) or None) == (ref["header"](ln) or None), repr(ln)
        assert deffile._substitute(ln, lambda name: f"<{name}>") == ref["subst"](ln), repr(ln)


def test_help_is_dedented_as_textwrap_does():
    """%help's text: its trailing blank lines dropped, textwrap.dedent, leading empty
    lines dropped (the old hand-written dedent was checked against textwrap on this
    random input)."""
    import random
    rnd = random.Random(11)
    pieces = ["", " ", "  ", "\t", " \t", "x", "y z", "\n", "\n", "\n", "  # c"]
    for _ in range(3000):
        text = "".join(rnd.choice(pieces) for _ in range(rnd.randrange(0, 12)))
        lines = text.split("\n")
        while lines and not lines[-1].strip():
            lines.pop()
        body = "\n".join(lines) + ("\n" if lines else "")
        want = textwrap.dedent(body).lstrip("\n")
        d = deffile.parse("Bootstrap: busybox\n%help\n" + text, "t.def")
        assert d.final.script("help") == want, repr(text)


def test_percent_lines_that_stay_script_text():
    """Only `%` + a letter at the start of a line is a section header: an indented
    `%word`, `%` + anything else and `%` further on a line are the script's."""
    d = parse("""
        Bootstrap: busybox
        %runscript
            printf '%s\\n' "$@"
            %notaheader
        %% literal
        %-8s
        % spaced
        %{braces}
        %help
            100% done
        """)
    run = d.final.script("runscript")
    for text in ("printf '%s", "    %notaheader", "%% literal", "%-8s", "% spaced", "%{braces}"):
        assert text in run, run
    assert d.final.script("help") == "100% done\n"


APPTAINER_PARSER = Path("/work/shared/testdata/apptainer/parser")


@pytest.mark.skipif(not APPTAINER_PARSER.is_dir(),
                    reason=f"Apptainer's parser test data not found ({APPTAINER_PARSER})")
def test_apptainer_parser_data_sections():
    """Apptainer's parser test data: no good file is refused for a section line (some
    are refused for things hpcimage does not support, e.g. no Bootstrap header), and
    its bad section is refused with its line number."""
    good = [p for d in ("testdata_good", "testdata_multi") for p in
            sorted((APPTAINER_PARSER / d).rglob("*"))
            if p.is_file() and p.suffix != ".json" and p.name != "result"]
    assert len(good) > 15
    for p in good:
        try:
            deffile.load(p)
        except UsageError as e:
            assert "section %" not in e.message, e.message
    with pytest.raises(UsageError) as e:
        deffile.load(APPTAINER_PARSER / "testdata_bad" / "bad_section")
    assert e.value.message.endswith("bad_section:3: unknown section %badsection (sections: "
                                    + ", ".join("%" + s for s in deffile.SECTIONS
                                                + deffile.APP_SECTIONS) + ")")
