"""The whole user path: site.yaml -> hpcimage generate -> module load (Lmod and
Environment Modules) -> image-exec/image-run/image-shell, as the non-root user, on
real images (busybox SquashFS and SIF)."""
import os
import shutil

import pytest

from conftest import cli_argv, PY
from modtools import module_script, requires_lmod, requires_envmodules


@pytest.fixture(scope="module")
def site(demo_sqfs, demo_sif, bare_dir, tmp_path_factory, user):
    d = tmp_path_factory.mktemp("site")
    os.chmod(d, 0o755)
    for p in (d, *d.parents):
        if str(p).startswith("/tmp/pytest-of-root"):
            os.chmod(p, 0o755)
    store = d / "store"
    store.mkdir()
    shutil.copy(demo_sqfs, store / "Demo-1.0.sqfs")
    shutil.copy(demo_sif, store / "Demo-2.0.sif")
    data = d / "data"
    data.mkdir()
    (data / "site-file").write_text("from the site bind\n")
    (d / "site.yaml").write_text(f"""
store: {store}
python: {PY}
extra_wrappers: [image-inspect]
binds:
  - {data}:/site-data:ro
  - /no/such/dir/on/this/host
images:
  - name: Demo
    version: "1.0"
    file: Demo-1.0.sqfs
    description: busybox demo, SquashFS
    default: true
  - name: Demo
    version: "2.0"
    file: Demo-2.0.sif
    description: busybox demo, SIF
  - name: Bare
    version: "1"
    file: {bare_dir}
    description: only busybox
""")
    r = user.run(cli_argv("generate", "--site", str(d / "site.yaml"), "--prefix", str(d / "out")),
                 root=True)
    assert r.returncode == 0, r.stderr
    os.system(f"chmod -R a+rX {d}")
    return d / "out"


SCRIPT = """
module load {module}
cd "$HOME"
image-exec sh -c 'cat /etc/os-release | head -1; echo "$HPCIMAGE_MODULE"; id -un; cat /site-data/site-file'
echo "exec=$?"
image-run echo "run arg"
image-shell -c 'echo shell-ok'
image-exec sh -c 'exit 9'
echo "status=$?"
"""


@requires_lmod
@pytest.mark.parametrize("module", ["Demo/1.0", "Demo/2.0", "Demo"])
def test_lmod_user_path(site, module):
    r = module_script("lmod", SCRIPT.format(module=module),
                      modulepath=[str(site / "modulefiles")], user="hpcuser")
    assert r.rc == 0, r.err
    out = r.out.splitlines()
    version = "2.0" if module.endswith("2.0") else "1.0"
    assert out[:4] == ['NAME="hpcimage Demo"', f"Demo/{version}", "hpcuser",
                       "from the site bind"], r.err
    assert "exec=0" in out
    assert "Hello from hpcimage Demo 1.0 (busybox)" in out and "run arg" in out
    assert "shell-ok" in out and "status=9" in out


@requires_envmodules
def test_environment_modules_user_path(site):
    r = module_script("em", SCRIPT.format(module="Demo/2.0"),
                      modulepath=[str(site / "modulefiles-tcl")], user="hpcuser")
    assert r.rc == 0, r.err
    assert r.out.splitlines()[:3] == ['NAME="hpcimage Demo"', "Demo/2.0", "hpcuser"]
    assert "status=9" in r.out


@requires_lmod
def test_swap_image_and_bare_image(site):
    r = module_script("lmod", """
module load Demo/1.0
module load Bare/1
image-exec sh -c 'ls /; echo "$HPCIMAGE_MODULE"'
image-run; echo "run=$?"
w=$(command -v image-exec)
module unload Bare
image-exec true; echo "unloaded=$?"
"$w" true; echo "nomodule=$?"
""", modulepath=[str(site / "modulefiles")], user="hpcuser")
    out = r.out.splitlines()
    assert "Bare/1" in out and "etc" not in out[:2]
    assert "run=1" in out and "nomodule=2" in out
    # README: without a module the wrappers are off PATH (the shell's 127); reached
    # by their path (a link, a site's PATH), they say so and exit 2
    assert "unloaded=127" in out and "image-exec: command not found" in r.err
    assert "image-exec: no image module loaded" in r.err


@requires_lmod
def test_image_inspect_wrapper(site):
    r = module_script("lmod", "module load Demo/2.0\nimage-inspect\nimage-inspect --json\n"
                      "image-inspect --summary\nmodule help Demo/2.0 2>&1",
                      modulepath=[str(site / "modulefiles")], user="hpcuser")
    assert r.rc == 0, r.err
    assert "  image-inspect [OPTIONS]" in r.out                 # `module help` lists it
    assert "\norg.label-schema.name: Demo\n" in r.out           # labels, as apptainer inspect
    assert '"type": "container"' in r.out                      # apptainer inspect --json
    assert "SIF objects:" in r.out and "(sif, " in r.out        # hpcimage's summary
