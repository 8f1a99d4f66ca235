"""Lmod inside the container (site.yaml `lmod_in_image`): the host's Lmod (Debian's
lmod package), its Lua and the site's MODULEPATH in an image that has neither Lmod nor
Lua (the Debian 12 debootstrap image), driven as the non-root user through the real
modulefiles and wrappers: `module load Debian/12`, then `module load TestMod` inside.
"""
import os
import shutil
import tempfile
from pathlib import Path

import pytest

from conftest import CACHE, PY
from modtools import (TEST_USER, generate, module_script, requires_lmod, requires_user,
                      world_tmp, write_site)  # noqa: F401

pytestmark = [requires_lmod, requires_user]

TESTVAL = "hello from TestMod"


def site_text(store, switch=True, prefix=None):
    text = f"""\
store: {store}
python: {PY}
images:
  - name: Debian
    version: "12"
    file: debian12-v1.sqfs
    description: Debian 12, no Lmod, no Lua
  - name: Demo
    version: "1.0"
    file: demo-v1.sqfs
    description: busybox
"""
    if switch:
        text += "lmod_in_image: true\n"
    if prefix:
        text += f"lmod_prefix: {prefix}\n"
    return text


@pytest.fixture(scope="module")
def mods():
    """A site modulefile directory outside every default bind ($HOME, /tmp, /var/tmp,
    cwd)."""
    d = Path(tempfile.mkdtemp(prefix="hpcimage-lmod-mods-", dir="/var/cache/hpcimage"))
    os.chmod(d, 0o755)
    (d / "TestMod").mkdir()
    (d / "TestMod" / "1.0.lua").write_text(
        f'whatis("a test module")\nsetenv("TESTVAR", "{TESTVAL}")\n'
        'prepend_path("TESTPATH", "/opt/testmod/bin")\n')
    os.system(f"chmod -R a+rX {d}")
    yield d
    shutil.rmtree(d, ignore_errors=True)


def render(world_tmp, name, **kw):
    conf = world_tmp / name
    conf.mkdir()
    write_site(conf, site_text(CACHE, **kw))
    p = generate("--site", conf / "site.yaml", "--prefix", world_tmp / (name + "-out"),
                 cwd=world_tmp)
    assert p.returncode == 0, p.stderr
    os.system(f"chmod -R a+rX {world_tmp}")
    return world_tmp / (name + "-out")


@pytest.fixture
def on(world_tmp, debian_sqfs, demo_sqfs):
    return render(world_tmp, "on")


@pytest.fixture
def off(world_tmp, debian_sqfs, demo_sqfs):
    return render(world_tmp, "off", switch=False)


def as_user(out, mods, script, module="Debian/12"):
    res = module_script("lmod", f"module load {module}\n{script}",
                        [out / "modulefiles", mods], user=TEST_USER)
    return res


def test_the_image_has_no_lmod_and_no_lua(debian_dir):
    """The proof below is only one where the image cannot do it by itself."""
    for p in ("usr/bin/lua5.3", "usr/bin/lua", "usr/share/lmod", "usr/share/lua",
              "usr/lib/x86_64-linux-gnu/libreadline.so.8", "etc/lmod"):
        assert not os.path.lexists(debian_dir / p), p


def test_module_load_inside_bash_c(on, mods):
    res = as_user(on, mods, "image-exec bash -c 'module load TestMod && "
                            "echo \"TESTVAR=$TESTVAR\"; module -t list 2>&1'\necho rc=$?")
    assert "rc=0" in res.out, res.err
    lines = res.out.splitlines()
    assert f"TESTVAR={TESTVAL}" in lines, (res.out, res.err)
    assert "TestMod/1.0" in lines and "Debian/12" in lines   # the host's loaded state too


def test_module_avail_inside_sees_the_site_modulefiles(on, mods):
    res = as_user(on, mods, "image-exec --contain bash -c 'module -t avail 2>&1'")
    avail = res.out.splitlines()
    assert "TestMod/1.0" in avail and "Debian/12" in avail, (res.out, res.err)


def test_module_in_sh_and_image_shell(on, mods):
    # A non-interactive POSIX sh (dash) reads no startup file: Lmod's init/sh, named
    # by $MODULESHOME, defines `module`; an interactive one reads it from $ENV.
    res = as_user(on, mods, """\
image-exec sh -c '. "$MODULESHOME/init/sh"; module load TestMod && echo "sh:$TESTVAR"'
image-exec sh -ic 'module load TestMod && echo "sh-i:$TESTVAR"' 2>/dev/null
image-shell -c 'module load TestMod && echo "shell-c:$TESTVAR"'
image-shell -i -c 'module load TestMod && echo "shell-i:$TESTVAR"' 2>/dev/null
""")
    lines = res.out.splitlines()
    for tag in ("sh", "sh-i", "shell-c", "shell-i"):
        assert f"{tag}:{TESTVAL}" in lines, (tag, res.out, res.err)


def test_cleanenv_keeps_modulepath_and_lmod(on, mods):
    res = as_user(on, mods, "image-exec --cleanenv bash -c 'echo \"MT=${_ModuleTable001_:-none}\"; "
                            "module load TestMod && echo \"TESTVAR=$TESTVAR\"; "
                            "echo \"MP=$MODULEPATH\"; module -t list 2>&1'")
    lines = res.out.splitlines()
    assert f"TESTVAR={TESTVAL}" in lines, (res.out, res.err)
    mp = next(x for x in lines if x.startswith("MP=")).split("=", 1)[1].split(":")
    assert str(mods) in mp and str(on / "modulefiles") in mp
    assert "MT=none" in lines                   # the host's module state stays out
    assert "TestMod/1.0" in lines and "Debian/12" not in lines


def test_switch_off_module_is_not_there(off, mods):
    res = as_user(off, mods, "image-exec bash -c 'module load TestMod; echo \"rc=$?\"'\n"
                             "image-exec --dry-run true")
    assert "rc=127" in res.out, (res.out, res.err)
    assert "module: command not found" in res.err
    binds = [x for x in res.out.splitlines() if x.startswith("bind ")]
    assert binds and not any("lmod" in x or "lua" in x for x in binds), binds
    assert "env ENV=" not in res.out and "--rcfile" not in res.out


def test_dry_run_shows_the_binds_with_their_reason(on, mods):
    res = as_user(on, mods, "image-exec --dry-run true\nimage-shell --dry-run")
    assert res.rc == 0, res.err
    out = res.out
    lua = os.path.realpath("/usr/bin/lua5.3")
    real = os.path.realpath("/usr/share/lmod/lmod")
    assert f"bind {lua} -> /usr/bin/lua5.3 ro  # Lua for Lmod (lmod_in_image)" in out
    assert f"bind {real} -> /usr/share/lmod/lmod ro  # Lmod inside (lmod_in_image)" in out
    assert f"bind {mods} -> {mods} ro  # MODULEPATH (lmod_in_image)" in out
    assert "-> /.singularity.d/libs/libreadline.so.8 ro  # library of Lmod's Lua" in out
    assert "/.singularity.d/libs/libc.so" not in out and "ld-linux" not in out
    assert "  env BASH_ENV=/usr/share/lmod/lmod/init/bash" in out
    assert "  env LD_LIBRARY_PATH=/.singularity.d/libs" in out
    assert "exec /bin/bash --rcfile /usr/share/lmod/lmod/init/bash  # " in out


def test_warning_where_the_host_has_no_lmod(world_tmp, mods, debian_sqfs, demo_sqfs):
    out = render(world_tmp, "nolmod", prefix="/no/such/lmod")
    res = as_user(out, mods, "image-exec bash -c 'echo ran; module load TestMod'\n"
                             "echo rc=$?")
    warn = [x for x in res.err.splitlines() if "warning" in x]
    assert warn == ["image-exec: warning: lmod_in_image: no Lmod on this host (no "
                    "libexec/lmod in /no/such/lmod (site.yaml lmod_prefix)): `module` is "
                    "not available in the image"], res.err
    assert res.out.splitlines() == ["ran", "rc=127"]     # it runs; `module` is not there


def test_busybox_image_without_glibc_runs_but_lua_cannot(on, mods):
    """The host's Lua is a glibc program: in an image without the dynamic loader it
    cannot start; the launch itself is not harmed."""
    res = as_user(on, mods, "image-exec sh -c 'echo ran; ls /usr/bin/lua5.3'\n"
                            "image-exec sh -c '. \"$MODULESHOME/init/sh\"; "
                            "module load TestMod; echo \"TESTVAR=${TESTVAR:-unset}\"'",
                  module="Demo/1.0")
    lines = res.out.splitlines()
    assert "ran" in lines and "/usr/bin/lua5.3" in lines, (res.out, res.err)
    assert "TESTVAR=unset" in lines


def _imported(user, site_json, image):
    r = user.run([PY, "-X", "importtime", "-I", "-m", "hpcimage.runtime", "image-exec",
                  "--dry-run", "true"],
                 env={"HPCIMAGE_IMAGE": str(image), "HPCIMAGE_SITE_CONFIG": str(site_json)})
    assert r.returncode == 0, r.stderr
    return {ln.split("|")[-1].strip() for ln in r.stderr.splitlines() if "|" in ln}


def test_lmod_discovery_is_imported_only_when_switched_on(user, on, off, demo_dir):
    assert "hpcimage.host.lmod" not in _imported(user, off / "wrappers" / "site.json", demo_dir)
    assert "hpcimage.host.lmod" in _imported(user, on / "wrappers" / "site.json", demo_dir)
