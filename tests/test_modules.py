"""The generated modulefiles under the real Lmod and the real Environment Modules 5."""
import json
import os
import shutil
import textwrap
from pathlib import Path

import pytest

from modtools import (REPO, TEST_USER, generate, load, module_script, requires_envmodules,
                      requires_lmod, requires_user, world_tmp, wrapper_code, write_site)  # noqa: F401

SITE = textwrap.dedent("""\
    store: /apps/images
    images:
      - name: Demo
        version: "1.0"
        file: Demo-1.0.sqfs
        description: The demo image
        default: true
      - name: Demo
        version: "2.0"
        file: Demo-2.0.sqfs
        description: A newer demo, not the default
      - name: Debian
        version: "12"
        file: Debian-12.sqfs
        description: Debian 12
    """)

LMODS = [pytest.param("lmod", marks=requires_lmod), pytest.param("lmod-cmd", marks=requires_lmod)]
ALL = LMODS + [pytest.param("em", marks=requires_envmodules)]


def root_of(system, prefix):
    return Path(prefix) / ("modulefiles-tcl" if system == "em" else "modulefiles")


@pytest.fixture
def prefix(world_tmp):
    """The test site rendered under a world-readable prefix (the test user loads it too)."""
    conf = world_tmp / "conf"
    conf.mkdir()
    write_site(conf, SITE)
    p = generate("--site", conf / "site.yaml", "--prefix", world_tmp / "out", cwd=world_tmp)
    assert p.returncode == 0, p.stderr
    return world_tmp / "out"


def assert_loaded(res, prefix, module, image):
    assert res.rc == 0, res.err
    assert res.env["HPCIMAGE_IMAGE"] == image
    assert res.env["HPCIMAGE_MODULE"] == module
    first = res.env["PATH"].split(":")[0]
    assert first == str(prefix / "wrappers")            # normalised, no ".."
    assert os.path.isfile(os.path.join(first, "image-exec"))


@pytest.mark.parametrize("system", ALL)
def test_load_sets_image_module_and_path(system, prefix):
    res = load(system, [root_of(system, prefix)], "Demo/1.0")
    assert_loaded(res, prefix, "Demo/1.0", "/apps/images/Demo-1.0.sqfs")
    assert "Demo/1.0" in res.out


@pytest.mark.parametrize("system", ALL)
def test_family_swap_default_avail_unload(system, prefix):
    script = textwrap.dedent("""\
        module -t avail 2>&1 | sed 's/^/AVAIL /'
        module load Demo/1.0
        module load Debian/12 2>/dev/null
        module -t list 2>&1 | sed 's/^/LIST1 /'
        module load Demo
        module -t list 2>&1 | sed 's/^/LIST2 /'
        printf 'IMG2 %s\\n' "$HPCIMAGE_IMAGE"
        module unload Demo
        module -t list 2>&1 | sed 's/^/LIST3 /'
        printf 'AFTER %s|%s|%s\\n' "${HPCIMAGE_IMAGE-unset}" "${HPCIMAGE_MODULE-unset}" "$PATH"
        """)
    res = module_script(system, script, [root_of(system, prefix)])
    assert res.rc == 0, res.err
    lines = res.out.splitlines()
    avail = [x.split()[1] for x in lines if x.startswith("AVAIL ") and len(x.split()) > 1]
    for m in ("Demo/1.0", "Demo/2.0", "Debian/12"):
        assert any(a.startswith(m) for a in avail), avail
    assert not any("wrappers" in a or "image-exec" in a for a in avail)
    assert [x for x in lines if x.startswith("LIST1 ") and "/" in x] == ["LIST1 Debian/12"]
    assert [x for x in lines if x.startswith("LIST2 ") and "/" in x] == ["LIST2 Demo/1.0"]
    assert "IMG2 /apps/images/Demo-1.0.sqfs" in lines    # default, though 2.0 is newer
    assert [x for x in lines if x.startswith("LIST3 ") and "/" in x] == []
    assert "AFTER unset|unset|/usr/local/bin:/usr/bin:/bin" in lines


@requires_lmod
@requires_user
def test_lmod_login_shell_as_user(prefix):
    res = module_script("lmod-login", "module load Demo/1.0\nmodule load Debian/12\n"
                        "module -t list 2>&1", [prefix / "modulefiles"], user=TEST_USER)
    assert_loaded(res, prefix, "Debian/12", "/apps/images/Debian-12.sqfs")
    assert res.out.strip().splitlines()[-1] == "Debian/12"


@requires_lmod
def test_lmod_login_shell_as_root(prefix):
    res = module_script("lmod-login", "module load Demo", [prefix / "modulefiles"])
    assert_loaded(res, prefix, "Demo/1.0", "/apps/images/Demo-1.0.sqfs")


@requires_envmodules
@requires_user
def test_envmodules_as_user(prefix):
    res = load("em", [prefix / "modulefiles-tcl"], "Demo/1.0", "Debian/12", user=TEST_USER)
    assert_loaded(res, prefix, "Debian/12", "/apps/images/Debian-12.sqfs")
    assert res.out.strip().splitlines()[-1] == "Debian/12"


@pytest.mark.parametrize("system", ALL)
def test_moved_tree_still_finds_its_wrappers(system, prefix, world_tmp):
    moved = world_tmp / "moved" / "deeper"
    shutil.copytree(prefix, moved)
    shutil.rmtree(prefix)
    res = load(system, [root_of(system, moved)], "Debian/12")
    assert_loaded(res, moved, "Debian/12", "/apps/images/Debian-12.sqfs")


@pytest.mark.parametrize("system", ALL)
@pytest.mark.parametrize("how", ["root", "file"])
def test_symlinked_tree_finds_its_wrappers(system, how, prefix, world_tmp):
    """A MODULEPATH entry that is a link to the rendered root (/apps/modulefiles ->
    /opt/site/modulefiles), or a tree whose modulefile is a link, puts the real
    wrappers directory on PATH (issue 12: a nonexistent one, next to the link)."""
    real = root_of(system, prefix)
    apps = world_tmp / "apps"
    apps.mkdir()
    if how == "root":
        (apps / real.name).symlink_to(os.path.relpath(real, apps))
    else:
        name = "1.0" if system == "em" else "1.0.lua"
        (apps / real.name / "Demo").mkdir(parents=True)
        (apps / real.name / "Demo" / name).symlink_to(real / "Demo" / name)
    res = load(system, [apps / real.name], "Demo/1.0")
    assert_loaded(res, prefix, "Demo/1.0", "/apps/images/Demo-1.0.sqfs")


@pytest.mark.parametrize("system", ALL)
def test_loaded_module_puts_working_wrappers_on_path(system, world_tmp):
    """module load, then `image-exec` from PATH execs the runtime (a stub here)."""
    stub = world_tmp / "python3"
    stub.write_text('#!/bin/sh\nprintf "%s|" "$HPCIMAGE_IMAGE" "$HPCIMAGE_MODULE" '
                    '"$HPCIMAGE_SITE_CONFIG" "$@"\n')
    stub.chmod(0o755)
    write_site(world_tmp, SITE + f"python: {stub}\n")
    assert generate(cwd=world_tmp).returncode == 0
    res = module_script(system, "module load Demo/2.0\nimage-exec ls 'a b'",
                        [root_of(system, world_tmp)])
    assert res.rc == 0, res.err
    assert res.out == (f"/apps/images/Demo-2.0.sqfs|Demo/2.0|{world_tmp}/wrappers/site.json|"
                       f"-I|-c|{wrapper_code('image-exec')}|image-exec|ls|a b|")


@pytest.mark.parametrize("system", ALL)
def test_committed_tree_loads(system):
    res = load(system, [root_of(system, REPO)], "Demo")
    assert_loaded(res, REPO, "Demo/1.0", "/opt/hpcimage/images/Demo-1.0.sqfs")


@requires_envmodules
@pytest.mark.skipif(not shutil.which("nagelfar.tcl"),
                    reason="nagelfar (needed by `module lint`) is not installed")
def test_envmodules_lint(prefix):
    res = module_script("em", "module lint 2>&1", [prefix / "modulefiles-tcl"])
    assert res.rc == 0 and "ERROR" not in res.out and "WARNING" not in res.out, res.out


# --------------------------------------------------------------------------
# Hostile strings render inert
# --------------------------------------------------------------------------

def hostile(canary):
    c = str(canary)
    return [
        f'"]] os.execute("touch {c}/lua1") --[[',
        f"$(touch {c}/sh1) `touch {c}/sh2`",
        f"[exec touch {c}/tcl1]",
        '"; os.exit(1) --',
        f'line one\nline two\n}}\nputs stderr injected\nexec touch {c}/tcl2\n{{',
        "back\\slash \\n \\",
        f"\"}} ; exec touch {c}/tcl3 ; set x {{\" ]] ; os.execute('touch {c}/lua2') --",
    ]


@pytest.mark.parametrize("system", ALL)
def test_hostile_descriptions_and_paths_are_inert(system, world_tmp):
    canary = world_tmp / "canary"
    canary.mkdir()
    texts = hostile(canary)
    weird_file = f"we'ird $(touch {canary}/img1) [exec touch {canary}/img2] \"q\" ]].sqfs"
    images = [{"name": f"Evil{i}", "version": "1", "file": weird_file, "description": t,
               "help": t, "url": t.replace("\n", " ")} for i, t in enumerate(texts)]
    write_site(world_tmp, json.dumps({"store": "/apps/images", "images": images}))
    assert generate(cwd=world_tmp).returncode == 0
    script = ""
    for i in range(len(texts)):
        script += (f"module load Evil{i}/1 || echo LOADFAIL\n"
                   f"printf 'IMG%d=%s\\n' {i} \"$HPCIMAGE_IMAGE\"\n"
                   f"module help Evil{i}/1 2>&1\nmodule whatis Evil{i}/1 2>&1\n"
                   f"module show Evil{i}/1 >/dev/null 2>&1\n")
    res = module_script(system, script, [root_of(system, world_tmp)], cwd=canary)
    assert res.rc == 0, res.err
    assert "LOADFAIL" not in res.out
    assert list(canary.iterdir()) == []                          # nothing ran
    assert "injected" not in res.err
    for i, t in enumerate(texts):
        assert f"IMG{i}=/apps/images/{weird_file}\n" in res.out
        for line in t.splitlines():
            assert line in res.out                              # `module help` shows it
        assert " ".join(t.split()) in res.out                   # whatis: one line
    assert res.env["HPCIMAGE_MODULE"] == f"Evil{len(texts) - 1}/1"


# ------------------------------------------------- names both module systems load

# Every character site.yaml takes in a module name or version but '+': each loads by
# `module load NAME/VERSION` in Lmod and in Environment Modules 5 alike.
ODD_NAMES = [("Py_thon-3.x", "1.0_b-c"), ("R", "v2.0.1-rc1"), ("gcc.cuda", "1..2"),
             ("T", "2024.01."), ("U", "1-"), ("9lives", "0")]


@pytest.mark.parametrize("system", ALL)
def test_every_accepted_name_loads(system, world_tmp):
    conf = world_tmp / "conf"
    conf.mkdir()
    write_site(conf, "store: /apps/images\nimages:\n" + "".join(
        f"  - {{name: '{n}', version: '{v}', file: {n}-{v}.sqfs}}\n" for n, v in ODD_NAMES))
    p = generate("--site", conf / "site.yaml", "--prefix", world_tmp / "out", cwd=world_tmp)
    assert p.returncode == 0, p.stderr
    for n, v in ODD_NAMES:
        res = load(system, [root_of(system, world_tmp / "out")], f"{n}/{v}")
        assert_loaded(res, world_tmp / "out", f"{n}/{v}", f"/apps/images/{n}-{v}.sqfs")


@pytest.mark.parametrize("key,name,version", [("version", "A", "1.0+cuda"),
                                              ("name", "C+x", "1")])
def test_plus_is_refused_naming_the_image(world_tmp, key, name, version):
    """Environment Modules 5 reads `module load A/1.0+cuda` as A/1.0 with the variant
    cuda: generate refuses the name rather than render a module one system cannot load."""
    conf = world_tmp / "conf"
    conf.mkdir()
    write_site(conf, "store: /apps/images\nimages:\n  - {name: B, version: '1', file: b}\n"
               f"  - name: '{name}'\n    version: '{version}'\n    file: a.sqfs\n")
    p = generate("--site", conf / "site.yaml", "--prefix", world_tmp / "out", cwd=world_tmp)
    line = 4 if key == "name" else 5
    assert (p.returncode, p.stdout) == (2, "")
    assert p.stderr == (
        f"hpcimage: error: {conf}/site.yaml:{line}: images[1].{key}: image {name}/{version}: '+' in "
        f"a module's {key} is variant syntax in Environment Modules 5 ('module load "
        f"{name}/{version}' would not find it there); use '-', '_' or '.' instead\n")
    assert not (world_tmp / "out").exists()
