"""site.yaml -> Site: typed values, defaults, and every bad-input error.

Each error case runs the real `hpcimage generate` entry point (in process, for
speed; a few through a subprocess) and checks the one-line message, exit 2,
and that nothing was written.
"""
import subprocess
import textwrap

import pytest

from modtools import REPO, cli_env, hpcimage_cmd, snapshot, write_site

from hpcimage import cli
from hpcimage.config import site
from hpcimage.errors import UsageError

GOOD = """\
store: /apps/images
images:
  - name: Ubuntu
    version: "16.04"
    file: Ubuntu-16.04.sqfs
    description: Ubuntu 16.04 LTS
    default: true
"""


def run_main(monkeypatch, capsys, cwd, *args):
    """`hpcimage ARGS` in process -> (status, stdout, stderr)."""
    monkeypatch.chdir(cwd)
    with pytest.raises(SystemExit) as exc:
        cli.main(list(args))
    out, err = capsys.readouterr()
    return exc.value.code, out, err


# --------------------------------------------------------------------------
# Good input
# --------------------------------------------------------------------------

def test_typed_values_and_defaults(tmp_path):
    p = write_site(tmp_path, GOOD)
    s = site.load(p)
    assert s.store == "/apps/images"
    assert (s.modulefiles, s.tcl_modulefiles, s.wrappers) == (
        "modulefiles", "modulefiles-tcl", "wrappers")
    assert s.python == "/opt/hpcimage/venv/bin/python3"
    assert s.binds == ()
    (img,) = s.images
    assert (img.name, img.version, img.module) == ("Ubuntu", "16.04", "Ubuntu/16.04")
    assert img.path == "/apps/images/Ubuntu-16.04.sqfs"
    assert img.default is True and img.binds == () and img.help == "" and img.url == ""
    assert img.line == 3
    assert s.roots() == {"modulefiles": f"{tmp_path}/modulefiles",
                         "tcl_modulefiles": f"{tmp_path}/modulefiles-tcl",
                         "wrappers": f"{tmp_path}/wrappers"}


def test_relative_store_and_paths(tmp_path):
    p = write_site(tmp_path, textwrap.dedent("""\
        store: images
        modulefiles: out/lua
        tcl_modulefiles: /abs/tcl
        wrappers: out/bin
        python: /usr/bin/python3
        binds: [/scratch, "/apps:/apps:ro", "/data:/mnt/data"]
        images:
          - {name: A, version: 1, file: a.sqfs, description: "x", binds: ["/x:/y:rw"],
             help: "more help", url: "https://example.org/a"}
          - {name: B, version: 2.10, file: /elsewhere/b.sqfs}
          - {name: B, version: "2.9", file: b29.sqfs, default: false}
        """))
    s = site.load(p)
    assert s.store == f"{tmp_path}/images"
    a, b, b29 = s.images
    assert a.path == f"{tmp_path}/images/a.sqfs"
    assert a.version == "1"
    assert b.version == "2.10"                 # an unquoted number is kept verbatim
    assert b.path == "/elsewhere/b.sqfs"
    assert [x.spec for x in s.binds] == ["/scratch", "/apps:/apps:ro", "/data:/mnt/data"]
    assert [(x.src, x.dst, x.mode) for x in s.binds] == [
        ("/scratch", "/scratch", "rw"), ("/apps", "/apps", "ro"), ("/data", "/mnt/data", "rw")]
    assert s.roots() == {"modulefiles": f"{tmp_path}/out/lua",
                         "tcl_modulefiles": "/abs/tcl",
                         "wrappers": f"{tmp_path}/out/bin"}
    # --prefix: relative roots go below it, absolute ones are staged below it too
    assert s.roots("/stage") == {"modulefiles": "/stage/out/lua",
                                 "tcl_modulefiles": "/stage/abs/tcl",
                                 "wrappers": "/stage/out/bin"}
    assert s.policy() == {"binds": ["/scratch", "/apps:/apps:ro", "/data:/mnt/data"],
                          "image_binds": {"A/1": ["/x:/y:rw"]},
                          "local": "~/.hpcimage/images", "version": 1}


def test_merge_keys_and_anchors(tmp_path):
    p = write_site(tmp_path, textwrap.dedent("""\
        store: /s
        common: &common {description: shared text, binds: [/scratch]}
        images: []
        """))
    with pytest.raises(UsageError, match=r"site.yaml:2: common: unknown key"):
        site.load(p)
    p = write_site(tmp_path, textwrap.dedent("""\
        store: /s
        images:
          - &first {name: A, version: "1", file: a, description: shared text}
          - {<<: *first, version: "2"}
        """))
    a, a2 = site.load(p).images
    assert (a2.module, a2.description, a2.path) == ("A/2", "shared text", "/s/a")


def test_free_text_descriptions_are_kept(tmp_path):
    hostile = '"]] os.execute("touch x") --[[ $(touch x) [exec touch x] `x` \\ \'q\'\nline 2\t\x01'
    p = write_site(tmp_path, "store: /s\nimages:\n  - name: A\n    version: '1'\n    file: a\n"
                   f"    description: {yaml_quote(hostile)}\n")
    assert site.load(p).images[0].description == hostile


def yaml_quote(s):
    import json
    return json.dumps(s)   # a JSON string is a YAML double-quoted scalar


def test_empty_images_list_is_allowed(tmp_path):
    s = site.load(write_site(tmp_path, "store: /s\nimages: []\n"))
    assert s.images == ()


# --------------------------------------------------------------------------
# Bad input: one line, exit 2, nothing written
# --------------------------------------------------------------------------

IMG = "  - name: A\n    version: '1'\n    file: a.sqfs\n"

BAD = [
    # (id, site.yaml text, expected stderr line after "hpcimage: error: ")
    ("empty", "", "site.yaml:1: empty file: expected a mapping with 'store' and 'images'"),
    ("comments-only", "# nothing\n\n",
     "site.yaml:1: empty file: expected a mapping with 'store' and 'images'"),
    ("syntax", "store: /s\nimages: [\n  {name: A\n",
     "site.yaml:4: invalid YAML: expected ',' or '}', but got '<stream end>'"),
    ("syntax-indent", "store: /s\n  images: []\n",
     "site.yaml:2: invalid YAML: mapping values are not allowed here"),
    ("two-documents", "store: /s\n---\nstore: /t\n",
     "site.yaml:2: invalid YAML: expected a single document in the stream, but found another document"),
    ("top-list", "- store\n", "site.yaml:1: expected a mapping, got a list"),
    ("top-scalar", "hello\n", "site.yaml:1: expected a mapping, got a string"),
    ("missing-store", "images: []\n", "site.yaml:1: store: required key is missing"),
    ("missing-images", "store: /s\n", "site.yaml:1: images: required key is missing"),
    ("missing-file", "store: /s\nimages:\n" + IMG + "  - name: B\n    version: '1'\n",
     "site.yaml:6: images[1].file: required key is missing"),
    ("missing-name", "store: /s\nimages:\n  - {version: '1', file: a}\n",
     "site.yaml:3: images[0].name: required key is missing"),
    ("unknown-top", "store: /s\nstroe: /t\nimages: []\n",
     "site.yaml:2: stroe: unknown key (did you mean 'store'? known keys: store, modulefiles, "
     "tcl_modulefiles, wrappers, python, binds, images, gpu, gpu_devices, gpu_extra_libs, "
     "gpu_exclude_libs, gpu_extra_binaries, gpu_extra_devices, infiniband, ib_env, "
     "ib_extra_libs, ib_memlock_min, mpi, signing, local, keep, extra_wrappers, lmod_in_image, "
     "lmod_prefix, warm, writable_tmpfs_size, overlay_driver)"),
    ("lmod-misspelt", "store: /s\nimages: []\nlmod_inside: true\n",
     "site.yaml:3: lmod_inside: unknown key (did you mean 'lmod_in_image'?"),
    ("lmod-in-image-string", "store: /s\nimages: []\nlmod_in_image: 'yes'\n",
     "site.yaml:3: lmod_in_image: expected true or false, got a string"),
    ("lmod-in-image-list", "store: /s\nimages: []\nlmod_in_image: [true]\n",
     "site.yaml:3: lmod_in_image: expected true or false, got a list"),
    ("lmod-prefix-relative", "store: /s\nimages: []\nlmod_in_image: true\n"
     "lmod_prefix: usr/share/lmod/lmod\n",
     "site.yaml:4: lmod_prefix: must be an absolute path, got 'usr/share/lmod/lmod'"),
    ("lmod-prefix-int", "store: /s\nimages: []\nlmod_in_image: true\nlmod_prefix: 8\n",
     "site.yaml:4: lmod_prefix: expected a path, got an integer"),
    ("lmod-prefix-newline", "store: /s\nimages: []\nlmod_in_image: true\n"
     "lmod_prefix: \"/opt/lmod\\nx\"\n",
     "site.yaml:4: lmod_prefix: must not contain control characters"),
    ("lmod-prefix-without-switch", "store: /s\nimages: []\n\nlmod_prefix: /opt/lmod/lmod\n",
     "site.yaml:4: lmod_prefix: has no effect without 'lmod_in_image: true'"),
    ("lmod-prefix-switch-off", "store: /s\nlmod_in_image: false\nimages: []\n"
     "lmod_prefix: /opt/lmod/lmod\n",
     "site.yaml:4: lmod_prefix: has no effect without 'lmod_in_image: true'"),
    ("gpu-devices", "store: /s\nimages: []\ngpu: nvidia\ngpu_devices: some\n",
     "site.yaml:4: gpu_devices: must be one of visible, all, not 'some'"),
    ("mpi-mode", "store: /s\nimages: []\nmpi:\n  mode: magic\n",
     "site.yaml:4: mpi.mode: must be one of hybrid, bind, not 'magic'"),
    ("mpi-unknown", "store: /s\nimages: []\nmpi:\n  lancher: srun\n",
     "site.yaml:4: mpi.lancher: unknown key (did you mean 'launcher'? known keys: mode, "
     "launcher, srun_mpi, implementation, prefix, libs, binds)"),
    ("mpi-lib", "store: /s\nimages: []\nmpi:\n  libs: ['$(evil)']\n",
     "site.yaml:4: mpi.libs[0]: not a library name: '$(evil)'"),
    ("unknown-image", "store: /s\nimages:\n" + IMG + "    descripton: x\n",
     "site.yaml:6: images[0].descripton: unknown key (did you mean 'description'? known keys: "
     "name, version, file, description, default, binds, help, url, personal_overlay, verify)"),
    ("duplicate-key", "store: /s\nimages: []\nstore: /t\n",
     "site.yaml:3: store: duplicate key (first at line 1)"),
    ("images-not-list", "store: /s\nimages: {name: A}\n",
     "site.yaml:2: images: expected a list, got a mapping"),
    ("images-null", "store: /s\nimages:\n",
     "site.yaml:2: images: expected a list, got nothing (null)"),
    ("image-not-mapping", "store: /s\nimages:\n  - Ubuntu\n",
     "site.yaml:3: images[0]: expected a mapping, got a string"),
    ("name-int", "store: /s\nimages:\n  - {name: 12, version: '1', file: a}\n",
     "site.yaml:3: images[0].name: expected a string, got an integer"),
    ("store-list", "store: [/s]\nimages: []\n", "site.yaml:1: store: expected a path, got a list"),
    ("store-empty", "store: ''\nimages: []\n", "site.yaml:1: store: must not be empty"),
    ("version-null", "store: /s\nimages:\n  - name: A\n    version:\n    file: a\n",
     "site.yaml:4: images[0].version: expected a string, got nothing (null)"),
    ("version-date", "store: /s\nimages:\n  - {name: A, version: 2024-01-02, file: a}\n",
     "site.yaml:3: images[0].version: expected a string, got a date"),
    ("description-list", "store: /s\nimages:\n" + IMG + "    description: [a]\n",
     "site.yaml:6: images[0].description: expected a string, got a list"),
    ("default-string", "store: /s\nimages:\n" + IMG + "    default: 'yes'\n",
     "site.yaml:6: images[0].default: expected true or false, got a string"),
    ("name-slash", "store: /s\nimages:\n  - {name: a/b, version: '1', file: a}\n",
     "site.yaml:3: images[0].name: invalid name 'a/b': must match "
     "[A-Za-z0-9][A-Za-z0-9._+-]* (letters, digits, '.', '_', '+', '-'; no '/', quotes, "
     "spaces or '$')"),
    ("name-quote", "store: /s\nimages:\n  - {name: 'a\"b', version: '1', file: a}\n",
     "site.yaml:3: images[0].name: invalid name 'a\"b'"),
    ("name-dollar", "store: /s\nimages:\n" + IMG + "  - {name: '$(touch x)', version: '1', file: a}\n",
     "site.yaml:6: images[1].name: invalid name '$(touch x)'"),
    ("name-space", "store: /s\nimages:\n  - {name: 'a b', version: '1', file: a}\n",
     "site.yaml:3: images[0].name: invalid name 'a b'"),
    ("name-newline", "store: /s\nimages:\n  - {name: \"a\\nb\", version: '1', file: a}\n",
     "site.yaml:3: images[0].name: invalid name 'a\\nb'"),
    ("name-dot", "store: /s\nimages:\n  - {name: ..., version: '1', file: a}\n",
     "site.yaml:3: images[0].name: invalid name '...'"),
    ("version-slash", "store: /s\nimages:\n  - {name: A, version: '1/2', file: a}\n",
     "site.yaml:3: images[0].version: invalid version '1/2'"),
    ("version-reserved", "store: /s\nimages:\n  - {name: A, version: default, file: a}\n",
     "site.yaml:3: images[0].version: 'default' is reserved by the module systems"),
    ("duplicate-image", "store: /s\nimages:\n" + IMG + IMG,
     "site.yaml:6: images[1]: duplicate image A/1 (first at line 3)"),
    ("two-defaults", "store: /s\nimages:\n" + IMG + "    default: true\n"
     "  - {name: A, version: '2', file: b, default: true}\n",
     "site.yaml:7: images[1].default: A already has a default version (1, line 3)"),
    ("file-newline", "store: /s\nimages:\n  - {name: A, version: '1', file: \"a\\nb\"}\n",
     "site.yaml:3: images[0].file: must not contain control characters (newlines, tabs, ...)"),
    ("description-nul", "store: /s\nimages:\n" + IMG + "    description: \"a\\0b\"\n",
     "site.yaml:6: images[0].description: must not contain NUL characters"),
    ("python-relative", "store: /s\npython: bin/python3\nimages: []\n",
     "site.yaml:2: python: must be an absolute path, got 'bin/python3'"),
    ("bind-relative", "store: /s\nbinds: [scratch]\nimages: []\n",
     "site.yaml:2: binds[0]: source of bind 'scratch' must be an absolute path"),
    ("bind-dst-relative", "store: /s\nbinds: [/a, '/b:b']\nimages: []\n",
     "site.yaml:2: binds[1]: bind '/b:b': destination must be an absolute path"),
    ("bind-mode", "store: /s\nbinds:\n  - /a:/b:rx\nimages: []\n",
     "site.yaml:3: binds[0]: bind '/a:/b:rx': unknown option 'rx' (options: ro, rw, "
     "image-src=PATH, id=N)"),
    ("bind-parts", "store: /s\nbinds: ['/a:/b:ro:x']\nimages: []\n",
     "site.yaml:2: binds[0]: bind '/a:/b:ro:x': too many ':' (want SRC[:DST[:OPTIONS]]; "
     "a ':' in a path is written '\\:')"),
    ("bind-comma", "store: /s\nbinds: ['/a,/b']\nimages: []\n",
     "site.yaml:2: binds[0]: one bind per entry, got '/a,/b' (a ',' in a path is "
     "written '\\,')"),
    ("binds-string", "store: /s\nbinds: /scratch\nimages: []\n",
     "site.yaml:2: binds: expected a list, got a string"),
    ("image-bind", "store: /s\nimages:\n" + IMG + "    binds: [/a, 'rel']\n",
     "site.yaml:6: images[0].binds[1]: source of bind 'rel' must be an absolute path"),
    ("wrappers-inside-modulefiles", "store: /s\nwrappers: modulefiles/bin\nimages: []\n",
     "site.yaml:2: wrappers: must not be the same as, inside or around modulefiles "
     "('modulefiles/bin' vs 'modulefiles'): each output root holds only its own files"),
    ("same-roots", "store: /s\nmodulefiles: mf\ntcl_modulefiles: ./mf\nimages: []\n",
     "site.yaml:3: tcl_modulefiles: must not be the same as, inside or around modulefiles"),
    ("root-colon", "store: /s\nwrappers: 'a:b'\nimages: []\n",
     "site.yaml:2: wrappers: must not contain ':' (it ends up in PATH/MODULEPATH)"),
    ("python-tag", "store: !!python/name:os.system ''\nimages: []\n",
     "site.yaml:1: store: expected a path, got a value tagged tag:yaml.org,2002:python/name:os.system"),
    ("merge-scalar", "store: /s\n<<: 3\nimages: []\n",
     "site.yaml:1: invalid merge: expected a mapping or list of mappings for merging, "
     "but found scalar"),
    ("int-key", "store: /s\n12: x\nimages: []\n",
     "site.yaml:2: keys must be strings, got an integer"),
]


@pytest.mark.parametrize("text,expected", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_site_exits_2_with_one_line_and_writes_nothing(tmp_path, monkeypatch, capsys,
                                                         text, expected):
    write_site(tmp_path, text)
    before = snapshot(tmp_path)
    status, out, err = run_main(monkeypatch, capsys, tmp_path, "generate")
    assert status == 2
    assert out == ""
    assert err.count("\n") == 1, err
    assert err.startswith("hpcimage: error: " + expected), err
    assert "Traceback" not in err
    assert snapshot(tmp_path) == before          # nothing written


def test_missing_site_file(tmp_path, monkeypatch, capsys):
    status, out, err = run_main(monkeypatch, capsys, tmp_path, "generate")
    assert (status, out) == (2, "")
    assert err == "hpcimage: error: site.yaml: cannot read: No such file or directory\n"
    status, out, err = run_main(monkeypatch, capsys, tmp_path, "generate", "--site", "nope.yml")
    assert err == "hpcimage: error: nope.yml: cannot read: No such file or directory\n"
    assert list(tmp_path.iterdir()) == []


def test_invalid_utf8(tmp_path, monkeypatch, capsys):
    (tmp_path / "site.yaml").write_bytes(b"store: /s\nimages: []\n# \xff\n")
    status, _, err = run_main(monkeypatch, capsys, tmp_path, "generate")
    assert status == 2
    assert err == "hpcimage: error: site.yaml:3: not valid UTF-8\n"


def test_bad_site_leaves_existing_tree_untouched(tmp_path, monkeypatch, capsys):
    write_site(tmp_path, GOOD)
    status, _, _ = run_main(monkeypatch, capsys, tmp_path, "generate")
    assert status == 0
    before = snapshot(tmp_path)
    # a valid first image and a broken second: still nothing may change
    write_site(tmp_path, GOOD.replace("Ubuntu 16.04 LTS", "changed") +
               "  - {name: 'x y', version: '1', file: a}\n")
    status, _, err = run_main(monkeypatch, capsys, tmp_path, "generate")
    assert status == 2
    assert err == ("hpcimage: error: site.yaml:8: images[1].name: invalid name 'x y': must "
                   "match [A-Za-z0-9][A-Za-z0-9._+-]* (letters, digits, '.', '_', '+', '-'; "
                   "no '/', quotes, spaces or '$')\n")
    after = snapshot(tmp_path)
    del before["site.yaml"], after["site.yaml"]
    assert after == before


def test_error_through_the_real_command_has_no_traceback(tmp_path):
    """The same as above through a separate process and the module entry point."""
    write_site(tmp_path, "store: /s\nimages:\n  - {name: A, version: '1'}\n")
    p = subprocess.run(hpcimage_cmd() + ["generate"], cwd=tmp_path, env=cli_env(),
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 2
    assert p.stdout == ""
    assert p.stderr == "hpcimage: error: site.yaml:3: images[0].file: required key is missing\n"
    assert sorted(x.name for x in tmp_path.iterdir()) == ["site.yaml"]


def test_error_names_the_site_path_as_given(tmp_path, monkeypatch, capsys):
    (tmp_path / "conf").mkdir()
    write_site(tmp_path / "conf", "store: /s\nimages: 3\n")
    status, _, err = run_main(monkeypatch, capsys, tmp_path, "generate",
                              "--site", "conf/site.yaml")
    assert status == 2
    assert err == "hpcimage: error: conf/site.yaml:2: images: expected a list, got an integer\n"


def test_schema_tables_document_every_key():
    """docs/site-yaml.md names every key of the schema tables."""
    doc = (REPO / "docs" / "site-yaml.md").read_text()
    for key in list(site.SITE_KEYS) + list(site.IMAGE_KEYS) + list(site.MPI_KEYS):
        assert f"`{key}`" in doc, key


def test_gpu_ib_policy_compiled_into_site_json(tmp_path):
    (tmp_path / "site.yaml").write_text(
        "store: /s\nimages: []\ngpu: nvidia\ninfiniband: off\ngpu_extra_libs: [libfoo.so]\n"
        "ib_env:\n  UCX_TLS: rc,sm\n")
    pol = site.load(str(tmp_path / "site.yaml")).policy()
    assert pol["gpu"] == "nvidia" and pol["gpu_extra_libs"] == ["libfoo.so"]
    assert pol["ib_env"] == {"UCX_TLS": "rc,sm"} and pol["infiniband"] in ("off", False)


def test_lmod_in_image_compiled_into_site_json(tmp_path):
    """Off by default (no "lmod" in site.json); on: the Lua modulefiles root relative to
    the wrappers directory (site.json's own), and the prefix only where it is set."""
    (tmp_path / "site.yaml").write_text("store: /s\nimages: []\n")
    s = site.load(str(tmp_path / "site.yaml"))
    assert s.lmod_in_image is False and s.lmod_prefix is None
    assert "lmod" not in s.policy()
    (tmp_path / "site.yaml").write_text("store: /s\nimages: []\nlmod_in_image: true\n"
                                        "modulefiles: out/mf\nwrappers: bin\n")
    s = site.load(str(tmp_path / "site.yaml"))
    assert s.policy()["lmod"] == {"modulepath": ["../out/mf"]}
    assert s.policy(s.roots(prefix="/elsewhere"))["lmod"] == {"modulepath": ["../out/mf"]}
    (tmp_path / "site.yaml").write_text("store: /s\nimages: []\nlmod_in_image: yes\n"
                                        "lmod_prefix: /opt/lmod//lmod/\n")
    s = site.load(str(tmp_path / "site.yaml"))
    assert s.policy()["lmod"] == {"modulepath": ["../modulefiles"], "prefix": "/opt/lmod/lmod"}


# ----------------------------------------------------------- site.json -> Policy

def test_policy_defaults_in_one_table():
    """Policy(): every key of the table at its default; from_json keeps what site.json
    says and the defaults for the rest; mutable defaults are not shared."""
    from hpcimage.config.policy import POLICY_KEYS, Policy, MEMLOCK_MIN, DEFAULT_LOCAL
    p = Policy()
    assert [k for k, *_ in POLICY_KEYS] == list(Policy.__slots__)
    assert all(isinstance(t, str) and isinstance(m, str) and m for _k, t, _d, m in POLICY_KEYS)
    assert (p.binds, p.image_binds, p.local, p.version) == ((), {}, DEFAULT_LOCAL, None)
    assert (p.gpu, p.gpu_devices, p.infiniband) == ("auto", "visible", "auto")
    assert p.ib_memlock_min == MEMLOCK_MIN == 64 << 20 and p.ib_env == {}
    assert p.mpi == {} and p.lmod is None and p.gpu_extra_libs == ()
    assert Policy().mpi is not p.mpi
    q = Policy.from_json({"_comment": "x", "gpu": "off", "mpi": {"mode": "bind"},
                          "binds": ["/a"]})
    assert (q.gpu, q.mpi, q.binds, q.infiniband) == ("off", {"mode": "bind"}, ["/a"], "auto")
    assert Policy.from_json({}) == Policy() and q != Policy()
    with pytest.raises(AttributeError):
        p.other = 1


def test_policy_unknown_key_is_an_error(tmp_path):
    from hpcimage.config.policy import Policy, load_policy
    with pytest.raises(UsageError, match="unknown key 'gpus'") as e:
        Policy.from_json({"gpu": "off", "gpus": 1})
    assert e.value.status == 2
    sj = tmp_path / "site.json"
    sj.write_text('{"version": 1, "later_key": true}')
    with pytest.raises(UsageError, match=f"{sj}: unknown key 'later_key'"):
        load_policy({"HPCIMAGE_SITE_CONFIG": str(sj)})
    assert load_policy({}) == Policy()


def test_policy_knows_every_key_generate_writes(tmp_path):
    """What site.yaml compiles into site.json (every key set) is a Policy."""
    from hpcimage.config.policy import Policy
    (tmp_path / "site.yaml").write_text(
        "store: /s\nbinds: [/scratch]\nlocal: $SCRATCH/i\nlmod_in_image: true\n"
        "lmod_prefix: /opt/lmod\ngpu: nvidia\ngpu_devices: all\n"
        "gpu_extra_libs: [libx.so]\ngpu_exclude_libs: [liby.so]\n"
        "gpu_extra_binaries: [nvx]\ngpu_extra_devices: [/dev/x]\ninfiniband: on\n"
        "ib_env: {UCX_TLS: rc}\nib_extra_libs: [libz.so]\nib_memlock_min: 0\n"
        "mpi: {mode: bind, launcher: srun, srun_mpi: pmix, implementation: openmpi,"
        " prefix: /opt/mpi, libs: [libm.so], binds: [/opt/x]}\n"
        "images:\n- {name: A, version: '1', file: a.sqfs, binds: [/d]}\n")
    s = site.load(str(tmp_path / "site.yaml"))
    data = {"_comment": "generated", **s.policy()}
    p = Policy.from_json(data)
    for key, value in data.items():
        if key == "lmod":          # typed: config.policy.LmodInImage
            assert (p.lmod.prefix, list(p.lmod.modulepath)) == (
                value["prefix"], value["modulepath"]) == ("/opt/lmod", ["../modulefiles"])
        elif key != "_comment":
            assert getattr(p, key) == value, key


def test_mpi_defaults_are_one_table():
    """image-mpi's defaults for site.json "mpi" live in config.policy.MPI_DEFAULTS: the
    admin side's validation (config.site.MPI_KEYS) and the hot path read the same."""
    from hpcimage.config.policy import MPI_DEFAULTS, Policy
    from hpcimage.config.site import MPI_KEYS
    assert {k: key.default for k, key in MPI_KEYS.items()} == MPI_DEFAULTS
    assert Policy().mpi_setting("mode") == "hybrid"
    assert Policy.from_json({"mpi": {"mode": "bind"}}).mpi_setting("mode") == "bind"
    assert Policy.from_json({"mpi": {"launcher": "srun"}}).mpi_setting("mode") == "hybrid"
    with pytest.raises(KeyError):
        Policy().mpi_setting("no-such-key")
