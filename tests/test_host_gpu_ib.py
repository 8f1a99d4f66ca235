"""Host discovery for --nv, --rocm and --ib (hpcimage.host): ld.so.cache and ELF readers,
the HostRoot, and what the discovery binds on a fake host tree (tests/fakehost.py);
end-to-end as the non-root user through HPCIMAGE_HOST_ROOT=<fake host>."""
import errno
import os
import resource
import shutil
import struct
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

sys.path.insert(0, os.path.dirname(__file__))
import fakehost  # noqa: E402
from conftest import PY, runtime_argv  # noqa: E402

from hpcimage.host import Contribution, HostRoot, discover  # noqa: E402
from hpcimage.config.policy import validate_policy  # noqa: E402
from hpcimage.config.policy import Policy  # noqa: E402

P = Policy.from_json
from hpcimage.host import elf, gpu, ib, ldcache  # noqa: E402
from hpcimage.host import gpulibs as L  # noqa: E402

TRIPLET = fakehost.triplet()
LIBDIR = f"/usr/lib/{TRIPLET}"
ENV = {"PATH": "/usr/local/bin:/usr/bin:/bin"}
FUZZ = settings(max_examples=150, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


# ------------------------------------------------------------------ fixtures

def _base():
    base = Path("/tmp/hpcimage-tests")
    base.mkdir(exist_ok=True)
    base.chmod(0o755)
    return base


@pytest.fixture(scope="session")
def fake_root():
    d = tempfile.mkdtemp(prefix="fakehost-", dir=_base())
    os.chmod(d, 0o755)
    fakehost.build(d)
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="session")
def nohw_root(fake_root):
    """The same host without any device node: a login node with the drivers installed."""
    d = tempfile.mkdtemp(prefix="fakehost-nohw-", dir=_base())
    os.rmdir(d)
    fakehost.without_devices(fake_root, d)
    os.chmod(d, 0o755)
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def scratch_root(fake_root, tmp_path):
    """A private copy of the fake host (devices included) that a test may change."""
    d = tmp_path / "host"
    shutil.copytree(fake_root, d, symlinks=True, ignore=lambda p, n: (
        ["dev"] if os.path.abspath(p) == os.path.abspath(fake_root) else []))
    (d / "dev").mkdir()
    fakehost.make_devices(str(d))
    return d


def relink_cache(root):
    subprocess.run(["ldconfig", "-r", str(root)], check=True, capture_output=True)


def dsts(c):
    return [b[1] for b in c.binds]


def bind_of(c, dst):
    return next(b for b in c.binds if b[1] == dst)


# ------------------------------------------------------- synthetic test data

def make_cache(entries, fmt="new", bo="<"):
    """ld.so.cache bytes for entries [(soname, flags, path, hwcap)]."""
    n = len(entries)
    head = 48 if fmt == "new" else 16
    size = 24 if fmt == "new" else 12
    strings = bytearray()
    table = bytearray()
    base = head + n * size if fmt == "new" else 0
    for key, flags, value, hwcap in entries:
        k = base + len(strings)
        strings += key.encode() + b"\0"
        v = base + len(strings)
        strings += value.encode() + b"\0"
        if fmt == "new":
            table += struct.pack(bo + "iIIIQ", flags, k, v, 0, hwcap)
        else:
            table += struct.pack(bo + "iII", flags, k, v)
    if fmt == "new":
        endian = 2 if bo == "<" else 3
        hdr = ldcache.NEW_MAGIC + struct.pack(bo + "IIB3xI12x", n, len(strings), endian, 0)
    else:
        hdr = ldcache.OLD_MAGIC + b"\0" + struct.pack(bo + "I", n)
    return bytes(hdr + table + strings)


def make_elf(cls=64, bo="<", machine=62, soname=None, needed=(), rpath=None, runpath=None,
             vaddr=0x400000):
    """A minimal shared object: ELF header, PT_LOAD + PT_DYNAMIC, dynamic, strtab."""
    strtab = bytearray(b"\0")

    def s(x):
        off = len(strtab)
        strtab.extend(x.encode() + b"\0")
        return off
    dyn = [(1, s(x)) for x in needed]
    if soname:
        dyn.append((14, s(soname)))
    if rpath:
        dyn.append((15, s(rpath)))
    if runpath:
        dyn.append((29, s(runpath)))
    ehsize, phsize, dfmt = (64, 56, bo + "qQ") if cls == 64 else (52, 32, bo + "iI")
    dsize = struct.calcsize(dfmt)
    phoff = ehsize
    dynoff = phoff + 2 * phsize
    stroff = dynoff + (len(dyn) + 3) * dsize
    dyn += [(5, vaddr + stroff), (10, len(strtab)), (0, 0)]
    total = stroff + len(strtab)
    ident = b"\x7fELF" + bytes([1 if cls == 32 else 2, 1 if bo == "<" else 2, 1]) + bytes(9)
    if cls == 64:
        eh = struct.pack(bo + "16sHHIQQQIHHHHHH", ident, 3, machine, 1, 0, phoff, 0, 0,
                         ehsize, phsize, 2, 0, 0, 0)
        ph = struct.pack(bo + "IIQQQQQQ", 1, 5, 0, vaddr, vaddr, total, total, 0x1000)
        ph += struct.pack(bo + "IIQQQQQQ", 2, 6, dynoff, vaddr + dynoff, vaddr + dynoff,
                          len(dyn) * dsize, len(dyn) * dsize, 8)
    else:
        eh = struct.pack(bo + "16sHHIIIIIHHHHHH", ident, 3, machine, 1, 0, phoff, 0, 0,
                         ehsize, phsize, 2, 0, 0, 0)
        ph = struct.pack(bo + "IIIIIIII", 1, 0, vaddr, vaddr, total, total, 5, 0x1000)
        ph += struct.pack(bo + "IIIIIIII", 2, dynoff, vaddr + dynoff, vaddr + dynoff,
                          len(dyn) * dsize, len(dyn) * dsize, 6, 4)
    body = b"".join(struct.pack(dfmt, t, v) for t, v in dyn)
    out = eh + ph + body + bytes(strtab)
    assert len(out) == total
    return out


# ------------------------------------------------------------------ ldcache

def ldconfig_p(cache_file):
    """{(soname, path)} from `ldconfig -p -C file`."""
    r = subprocess.run(["ldconfig", "-p", "-C", str(cache_file)], capture_output=True,
                       text=True, check=True)
    out = set()
    for line in r.stdout.splitlines()[1:]:
        if "=>" in line:
            left, _, path = line.partition("=>")
            out.add((left.split(" (")[0].strip(), path.strip()))
    return out


def test_real_cache_matches_ldconfig_and_finds_libc():
    data = Path("/etc/ld.so.cache").read_bytes()
    entries = ldcache.parse(data)
    assert {(k, p) for k, _f, p in entries} == ldconfig_p("/etc/ld.so.cache")
    cache = ldcache.LdCache(HostRoot("/"))
    libc = cache.find("libc.so.6")
    assert libc and os.path.isfile(libc)
    info = elf.info(libc)
    assert info.soname == "libc.so.6" and info.elfclass == 64
    assert info.machine == elf.host_machine()
    assert cache.find("libdoes-not-exist.so.9") is None
    assert cache.entries() == entries


@pytest.mark.parametrize("fmt", ["new", "compat", "old"])
def test_fake_host_cache_every_format(fake_root, tmp_path, fmt):
    root = tmp_path / "r"
    fakehost.without_devices(fake_root, root)
    subprocess.run(["ldconfig", "-r", str(root), "-c", fmt], check=True, capture_output=True)
    data = (root / "etc/ld.so.cache").read_bytes()
    assert data.startswith(ldcache.NEW_MAGIC if fmt == "new" else ldcache.OLD_MAGIC)
    entries = ldcache.parse(data)
    assert {(k, p) for k, _f, p in entries} == ldconfig_p(root / "etc/ld.so.cache")
    flags = {k: f for k, f, _p in entries}
    assert flags["libcuda.so.1"] == ldcache.host_flags()[0]
    assert ("libhsa-runtime64.so.1", flags["libhsa-runtime64.so.1"],
            "/opt/rocm/lib/libhsa-runtime64.so.1") in entries


def test_cache_lookup_by_width_hwcap_and_byte_order(tmp_path):
    f64, f32 = ldcache.host_flags("x86_64")
    assert (f64, f32) == (0x0303, 0x0003)
    assert ldcache.host_flags("aarch64")[0] == 0x0A03
    entries = [("libfoo.so.1", f64, "/hw/x86-64-v3/libfoo.so.1", ldcache.HWCAP_EXTENSION | 2),
               ("libfoo.so.1", f64, "/lib64/libfoo.so.1", 0),
               ("libfoo.so.1", f32, "/lib32/libfoo.so.1", 0),
               ("libbar.so.2", 0x0A03, "/aarch64/libbar.so.2", 0)]
    for bo in "<>":
        for fmt in ("new", "old"):
            if fmt == "old" and bo == ">":
                continue
            data = make_cache(entries, fmt, bo)
            assert ldcache.parse(data) == [e[:3] for e in entries]
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc/ld.so.cache").write_bytes(make_cache(entries))
    c = ldcache.LdCache(HostRoot(str(tmp_path)), machine="x86_64")
    assert c.lookup("libfoo.so.1") == "/lib64/libfoo.so.1"
    assert c.lookup("libfoo.so.1", want64=False) == "/lib32/libfoo.so.1"
    assert c.lookup("libbar.so.2") is None              # another machine's library
    assert ldcache.LdCache(HostRoot(str(tmp_path)), machine="aarch64").lookup(
        "libbar.so.2") == "/aarch64/libbar.so.2"
    assert c.find("libfoo.so.1") is None                # listed, but no such file


@pytest.mark.parametrize("data", [
    b"", b"garbage", ldcache.NEW_MAGIC, ldcache.OLD_MAGIC, ldcache.OLD_MAGIC + b"\0" * 3,
    ldcache.NEW_MAGIC + struct.pack("<IIB3xI12x", 0xFFFFFFFF, 0, 2, 0),
    ldcache.NEW_MAGIC + struct.pack("<IIB3xI12x", 1, 0, 1, 0) + bytes(24),  # "invalid"
    ldcache.OLD_MAGIC + b"\0" + struct.pack("<I", 10 ** 6),
])
def test_cache_garbage_raises_valueerror(data):
    with pytest.raises(ValueError):
        ldcache.parse(data)


def test_cache_bad_string_offsets():
    good = make_cache([("libx.so.1", 0x303, "/lib/libx.so.1", 0)])
    bad = bytearray(good)
    struct.pack_into("<I", bad, 48 + 4, 10 ** 6)             # key far outside
    with pytest.raises(ValueError):
        ldcache.parse(bytes(bad))
    with pytest.raises(ValueError):                          # unterminated last string
        ldcache.parse(good[:-1])


@FUZZ
@given(st.binary(max_size=600), st.sampled_from([b"", ldcache.NEW_MAGIC, ldcache.OLD_MAGIC]))
def test_cache_fuzz_random(tail, magic):
    try:
        out = ldcache.parse(magic + tail)
    except ValueError:
        return
    assert isinstance(out, list)


@FUZZ
@given(st.data())
def test_cache_fuzz_mutated(data):
    base = bytearray(make_cache([("libcuda.so.1", 0x303, "/usr/lib/libcuda.so.1", 0),
                                 ("libm.so.6", 0x303, "/lib/libm.so.6", 0)],
                                data.draw(st.sampled_from(["new", "old"]))))
    for _ in range(data.draw(st.integers(1, 8))):
        i = data.draw(st.integers(0, len(base) - 1))
        base[i] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(base)))
    try:
        ldcache.parse(bytes(base[:cut]))
    except ValueError:
        pass


def test_ldcache_on_garbage_file_is_empty(tmp_path):
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc/ld.so.cache").write_bytes(os.urandom(4096))
    c = ldcache.LdCache(HostRoot(str(tmp_path)))
    assert c.entries() == [] and c.find("libc.so.6") is None
    assert "ld.so.cache" in c.error
    c = ldcache.LdCache(HostRoot(str(tmp_path / "nowhere")))
    assert c.entries() == [] and "No such file" in c.error


# ---------------------------------------------------------------------- elf

def test_elf_info_of_fake_host_libraries(fake_root):
    verbs = HostRoot(fake_root).realpath(f"{LIBDIR}/libibverbs.so.1")
    i = elf.info(verbs)
    assert (i.elfclass, i.machine, i.soname) == (64, elf.host_machine(), "libibverbs.so.1")
    assert "libnl-3.so.200" in i.needed and "libc.so.6" in i.needed
    assert elf.info(Path(verbs).read_bytes()) == i
    assert elf.header(verbs) == (64, "<", elf.host_machine())
    ls = elf.info("/bin/ls")
    assert ls.soname is None and "libc.so.6" in ls.needed


@pytest.mark.parametrize("cls,bo,machine", [(64, "<", 62), (32, "<", 3), (64, ">", 22),
                                            (32, ">", 8), (64, "<", 183)])
def test_elf_info_synthetic_classes_and_byte_orders(cls, bo, machine):
    data = make_elf(cls, bo, machine, soname="libq.so.3", needed=("liba.so.1", "libb.so.2"),
                    rpath="/r", runpath="$ORIGIN/../lib")
    i = elf.info(data)
    assert i == (cls, machine, "libq.so.3", ["liba.so.1", "libb.so.2"], "/r", "$ORIGIN/../lib")
    assert i.runpath == "$ORIGIN/../lib" and i.rpath == "/r"
    assert elf.header(data) == (cls, bo, machine)
    plain = elf.info(make_elf(cls, bo, machine))
    assert plain.soname is None and plain.needed == []


@pytest.mark.parametrize("mutate", [
    lambda b: b[:10],                                       # truncated ident
    lambda b: b"\x7fELF\x03" + b[5:],                       # bad class
    lambda b: b[:5] + b"\x07" + b[6:],                      # bad data encoding
    lambda b: b[:40],                                       # truncated header
    lambda b: b[:-5],                                       # string table cut
    lambda b: b[:32] + struct.pack("<Q", 10 ** 12) + b[40:],  # phoff outside
    lambda b: b[:56] + struct.pack("<H", 60000) + b[58:],   # absurd phnum
    lambda b: b"not an elf at all",
])
def test_elf_garbage_raises_valueerror(mutate):
    data = make_elf(64, "<", 62, soname="libz.so.1", needed=("liba.so.1",))
    with pytest.raises(ValueError):
        elf.info(mutate(data))


def test_elf_strtab_outside_every_segment():
    data = bytearray(make_elf(64, "<", 62, soname="libz.so.1"))
    # move PT_LOAD far away: DT_STRTAB no longer maps to the file
    struct.pack_into("<Q", data, 64 + 16, 0x7000000000)
    with pytest.raises(ValueError):
        elf.info(bytes(data))


@FUZZ
@given(st.data())
def test_elf_fuzz_mutated(data):
    cls = data.draw(st.sampled_from([32, 64]))
    b = bytearray(make_elf(cls, data.draw(st.sampled_from("<>")), 62, soname="libf.so.1",
                           needed=("liba.so.1",)))
    for _ in range(data.draw(st.integers(1, 10))):
        i = data.draw(st.integers(0, len(b) - 1))
        b[i] = data.draw(st.integers(0, 255))
    try:
        r = elf.info(bytes(b[:data.draw(st.integers(0, len(b)))]))
    except ValueError:
        return
    assert r.elfclass in (32, 64)


# ----------------------------------------------------------------- HostRoot

def test_hostroot_chroot_semantics(fake_root, tmp_path, monkeypatch):
    h = HostRoot(fake_root)
    assert h.path("/opt/rocm/lib") == f"{fake_root}/opt/rocm/lib"
    # /opt/rocm -> /opt/rocm-6.0.0 is absolute: it resolves inside the root
    assert h.resolve("/opt/rocm/lib/libhsa-runtime64.so.1") == \
        "/opt/rocm-6.0.0/lib/libhsa-runtime64.so.1.12.60000"
    assert h.realpath("/opt/rocm/bin/rocm-smi") == f"{fake_root}/opt/rocm-6.0.0/bin/rocm-smi"
    assert h.resolve("/../../../etc/../usr/bin/nvidia-smi") == "/usr/bin/nvidia-smi"
    assert h.isfile("/opt/rocm/bin/rocm-smi") and h.isdir("/opt/rocm")
    assert h.ischr("/dev/nvidia0") and not h.ischr("/usr/bin/nvidia-smi")
    assert h.listdir("/dev/infiniband") == ["issm0", "rdma_cm", "umad0", "uverbs0"]
    assert h.listdir("/no/such") == [] and not h.exists("/no/such")
    assert h.which("nvidia-smi", ["relative", "/usr/local/bin", "/usr/bin"]) == "/usr/bin/nvidia-smi"
    assert h.read_text("/etc/libibverbs.d/mlx5.driver") == "driver mlx5\n"
    # a link escaping with .. stays inside; a loop is ELOOP
    r = tmp_path / "r"
    (r / "a").mkdir(parents=True)
    os.symlink("../../../../etc", r / "a/up")
    (r / "etc").mkdir()
    assert HostRoot(str(r)).resolve("/a/up/passwd") == "/etc/passwd"
    os.symlink("loop2", r / "loop1")
    os.symlink("loop1", r / "loop2")
    with pytest.raises(OSError) as e:
        HostRoot(str(r)).resolve("/loop1/x")
    assert e.value.errno == errno.ELOOP
    assert not HostRoot(str(r)).exists("/loop1")
    monkeypatch.setenv("HPCIMAGE_HOST_ROOT", fake_root)
    assert HostRoot().root == fake_root and HostRoot(environ={}).root == "/"
    assert HostRoot("/").is_real and HostRoot("/").path("/dev/null") == "/dev/null"
    assert HostRoot("/").resolve("/dev/stdin") == os.path.realpath("/dev/stdin")


def test_contribution_merge_and_describe():
    a = Contribution()
    a.bind("/h/libcuda.so.1", "/.singularity.d/libs/libcuda.so.1", True, "nv")
    a.add_prepend("LD_LIBRARY_PATH", "/.singularity.d/libs")
    a.env["X"] = "1"
    a.hide.append("/dev/nvidia0")
    a.warnings.append("w")
    b = Contribution()
    assert b.bind("/other", "/.singularity.d/libs/libcuda.so.1", True, "dup")
    assert not b.bind("/again", "/.singularity.d/libs/libcuda.so.1")
    b.bind("/h/dev/infiniband", "/dev/infiniband", False, "ib")
    b.add_prepend("LD_LIBRARY_PATH", "/.singularity.d/libs")
    b.add_prepend("PATH", "/.singularity.d/bin")
    b.env["X"] = "2"
    b.hide.append("/dev/nvidia0")
    b.warnings.append("w")
    b.notes.append("n")
    assert not Contribution() and a
    m = a.merge(b)
    assert m is a
    assert a.binds == [("/h/libcuda.so.1", "/.singularity.d/libs/libcuda.so.1", True, "nv"),
                       ("/h/dev/infiniband", "/dev/infiniband", False, "ib")]
    assert a.device_binds == [("/h/dev/infiniband", "/dev/infiniband", False, "ib")]
    assert a.prepend == {"LD_LIBRARY_PATH": ["/.singularity.d/libs"],
                         "PATH": ["/.singularity.d/bin"]}
    assert a.env == {"X": "2"} and a.hide == ["/dev/nvidia0"]
    assert a.warnings == ["w"] and a.notes == ["n"]
    text = "\n".join(a.describe())
    assert "bind /h/libcuda.so.1 -> /.singularity.d/libs/libcuda.so.1 ro  # nv" in text
    assert "hide /dev/nvidia0" in text and "env X=2" in text and "warning: w" in text


# ---------------------------------------------------- visible devices, renumbering

@pytest.mark.parametrize("value,count,expect", [
    (None, 4, ("all", None, None)),
    ("all", 4, ("all", None, None)),
    ("", 4, ("none", [], None)),
    ("none", 4, ("none", [], None)),
    ("void", 4, ("none", [], None)),
    ("NoDevFiles", 4, ("none", [], None)),
    ("3,1", 4, ("some", [3, 1], "1,0")),
    ("3,1,5", 6, ("some", [3, 1, 5], "1,0,2")),          # Sarus's documented example
    ("2", 4, ("some", [2], "0")),
    (" 0 , 2 ", 4, ("some", [0, 2], "0,1")),
    ("1,1,0", 4, ("some", [1, 0], "1,0")),
    ("10,2", 12, ("some", [10, 2], "1,0")),              # numeric, not string, order
    ("0,7,1", 4, ("some", [0], "0")),                    # CUDA stops at an invalid entry
    ("x,1", 4, ("some", [], "")),
])
def test_parse_visible_and_renumber(value, count, expect):
    kind, idx, problem = gpu.parse_visible(value, count)
    assert (kind, idx) == expect[:2]
    if expect[2] is not None:
        assert gpu.renumber(idx) == expect[2]
    assert bool(problem) == (value in ("0,7,1", "x,1"))


def test_parse_visible_uuids_and_mig():
    uuids = {"GPU-aaaa-1": 0, "GPU-bbbb-2": 1, "GPU-bbbc-3": 2}
    assert gpu.parse_visible("GPU-bbbc,GPU-aaaa-1", 3, uuids)[:2] == ("some", [2, 0])
    kind, idx, problem = gpu.parse_visible("GPU-bbb", 3, uuids)     # ambiguous prefix
    assert idx == [] and "more than one" in problem
    assert gpu.parse_visible("GPU-aaaa", 3, None)[0] == "unmapped"
    assert gpu.parse_visible("MIG-1234", 3, uuids)[0] == "unmapped"


# ---------------------------------------------------------------- NVIDIA

LIBS = "/.singularity.d/libs"
BINS = "/.singularity.d/bin"


def test_nvidia_auto_binds_everything(fake_root):
    h = HostRoot(fake_root)
    c = gpu.discover_nvidia(h, P({}), ENV)
    d = dsts(c)
    for n in ("nvidiactl", "nvidia-uvm", "nvidia-uvm-tools", "nvidia-modeset", "nvidia-caps",
              "nvidia0", "nvidia1", "nvidia2", "nvidia3"):
        assert f"/dev/{n}" in d
        assert bind_of(c, f"/dev/{n}")[0] == f"{fake_root}/dev/{n}"
        assert bind_of(c, f"/dev/{n}")[2] is False
    for so in ("libcuda.so.1", "libcuda.so", "libnvidia-ml.so.1", "libnvidia-ptxjitcompiler.so.1"):
        src, _dst, ro, _why = bind_of(c, f"{LIBS}/{so}")
        assert ro and src.startswith(f"{fake_root}{LIBDIR}/") and src.endswith(fakehost.DRIVER)
    assert bind_of(c, f"{BINS}/nvidia-smi")[0] == f"{fake_root}/usr/bin/nvidia-smi"
    assert f"{BINS}/nvidia-debugdump" in d
    assert c.prepend == {"LD_LIBRARY_PATH": [LIBS], "PATH": [BINS]}
    assert c.env == {} and c.hide == [] and c.warnings == []
    assert all(b[1].startswith(("/dev/", LIBS + "/", BINS + "/")) for b in c.binds)
    notes = "\n".join(c.notes)
    assert "4 of 4 GPUs visible" in notes and "nvidia-persistenced" in notes


def test_nvidia_visible_subset_renumbered(fake_root):
    c = gpu.discover_nvidia(HostRoot(fake_root), P({}), dict(ENV, CUDA_VISIBLE_DEVICES="3,1"))
    gpus = [b[1] for b in c.binds if b[1][11:].isdigit()]
    assert gpus == ["/dev/nvidia3", "/dev/nvidia1"]
    assert sorted(c.hide) == ["/dev/nvidia0", "/dev/nvidia2"]
    assert c.env == {"CUDA_VISIBLE_DEVICES": "1,0"}
    assert "/dev/nvidiactl" in dsts(c) and f"{LIBS}/libcuda.so.1" in dsts(c)


def test_nvidia_visible_by_uuid(fake_root):
    c = gpu.discover_nvidia(HostRoot(fake_root), P({}), dict(
        ENV, CUDA_VISIBLE_DEVICES="GPU-00000000-0000-0000-0000-000000000002,GPU-00000000"
        "-0000-0000-0000-000000000000"))
    assert [b[1] for b in c.binds if b[1][11:].isdigit()] == ["/dev/nvidia2", "/dev/nvidia0"]
    assert c.env == {"CUDA_VISIBLE_DEVICES": "1,0"}


def test_nvidia_visible_devices_variable(fake_root):
    c = gpu.discover_nvidia(HostRoot(fake_root), P({}), dict(ENV, NVIDIA_VISIBLE_DEVICES="2"))
    assert [b[1] for b in c.binds if b[1][11:].isdigit()] == ["/dev/nvidia2"]
    assert c.env == {}                     # as with Docker: CUDA sees the one GPU as 0
    # CUDA_VISIBLE_DEVICES (set by Slurm) wins over NVIDIA_VISIBLE_DEVICES
    c = gpu.discover_nvidia(HostRoot(fake_root), P({}), dict(
        ENV, NVIDIA_VISIBLE_DEVICES="all", CUDA_VISIBLE_DEVICES="1"))
    assert [b[1] for b in c.binds if b[1][11:].isdigit()] == ["/dev/nvidia1"]
    assert c.env == {"CUDA_VISIBLE_DEVICES": "0"}


@pytest.mark.parametrize("var,value", [("CUDA_VISIBLE_DEVICES", ""),
                                       ("NVIDIA_VISIBLE_DEVICES", "none"),
                                       ("NVIDIA_VISIBLE_DEVICES", "void"),
                                       ("CUDA_VISIBLE_DEVICES", "NoDevFiles")])
def test_nvidia_no_visible_gpu(fake_root, var, value):
    c = gpu.discover_nvidia(HostRoot(fake_root), P({}), dict(ENV, **{var: value}))
    assert not [b for b in c.binds if b[1][11:].isdigit()]
    assert len(c.hide) == 4 and c.env == {}
    assert "/dev/nvidiactl" in dsts(c) and f"{LIBS}/libcuda.so.1" in dsts(c)


def test_nvidia_invalid_and_mig_entries(fake_root):
    c = gpu.discover_nvidia(HostRoot(fake_root), P({}), dict(ENV, CUDA_VISIBLE_DEVICES="1,9,2"))
    assert [b[1] for b in c.binds if b[1][11:].isdigit()] == ["/dev/nvidia1"]
    assert c.env == {"CUDA_VISIBLE_DEVICES": "0"}
    assert any("CUDA_VISIBLE_DEVICES=1,9,2" in w and "9 does not exist" in w for w in c.warnings)
    c = gpu.discover_nvidia(HostRoot(fake_root), P({}), dict(ENV, CUDA_VISIBLE_DEVICES="MIG-abc"))
    assert len([b for b in c.binds if b[1][11:].isdigit()]) == 4 and c.env == {} and not c.hide
    assert any("MIG" in w for w in c.warnings)


def test_nvidia_policy_all_devices_off_and_force(fake_root):
    h = HostRoot(fake_root)
    env = dict(ENV, CUDA_VISIBLE_DEVICES="3,1")
    c = gpu.discover_nvidia(h, P({"gpu_devices": "all"}), env)
    assert len([b for b in c.binds if b[1][11:].isdigit()]) == 4 and c.env == {} and not c.hide
    for mode in ("off", "rocm", False):
        c = gpu.discover_nvidia(h, P({"gpu": mode}), env)
        assert not c and not c.warnings
        assert gpu.discover_nvidia(h, P({"gpu": mode}), env, force=True).env == \
            {"CUDA_VISIBLE_DEVICES": "1,0"}
    c = gpu.discover_nvidia(h, P({"gpu": "bogus"}), ENV)
    assert c and any("gpu='bogus'" in w for w in c.warnings)


def test_auto_binds_nothing_without_hardware(nohw_root):
    h = HostRoot(nohw_root)
    for policy in ({}, {"gpu": "auto", "infiniband": "auto"}, {"gpu": "nvidia"},
                   {"gpu": "rocm"}):
        for env in (ENV, dict(ENV, CUDA_VISIBLE_DEVICES="0")):
            c = discover(P(policy), env, host=h)
            assert not c and c.binds == [] and c.env == {} and c.prepend == {}
            assert c.warnings == []
    assert any("no /dev/nvidiactl" in n for n in discover(P({}), ENV, host=h).notes)


def test_forced_without_hardware_binds_libraries_and_warns(nohw_root):
    h = HostRoot(nohw_root)
    c = gpu.discover_nvidia(h, P({}), ENV, force=True)
    assert not c.device_binds and f"{LIBS}/libcuda.so.1" in dsts(c)
    assert any("no NVIDIA GPU on this host" in w for w in c.warnings)
    c = gpu.discover_rocm(h, P({}), ENV, force=True)
    assert any("no AMD GPU" in w for w in c.warnings)
    c = ib.discover_ib(h, P({"ib_memlock_min": 0}), ENV, force=True)
    assert any("no InfiniBand/RDMA device" in w for w in c.warnings)
    assert f"{LIBS}/libibverbs.so.1" in dsts(c)
    c = ib.discover_ib(h, P({"infiniband": "on", "ib_memlock_min": 0}), ENV)
    assert f"{LIBS}/libibverbs.so.1" in dsts(c) and c.warnings


def test_nvidia_missing_pieces_are_warnings(scratch_root):
    root = scratch_root
    lib = root / LIBDIR.lstrip("/")
    for f in lib.glob("libnvidia-ml.so*"):
        f.unlink()
    (root / "usr/bin/nvidia-smi").unlink()
    (root / "dev/nvidia-uvm").unlink()
    relink_cache(root)
    c = gpu.discover_nvidia(HostRoot(str(root)), P({"gpu_extra_libs": ["libnvidia-extra.so"],
                                                  "gpu_extra_binaries": ["nvidia-extra"]}), ENV)
    w = "\n".join(c.warnings)
    for missing in ("libnvidia-ml.so", "nvidia-smi", "/dev/nvidia-uvm", "libnvidia-extra.so",
                    "nvidia-extra"):
        assert missing in w
    assert f"{LIBS}/libcuda.so.1" in dsts(c) and "/dev/nvidia0" in dsts(c)
    assert "/dev/nvidia-uvm" not in dsts(c)


def test_nvidia_extra_and_excluded_libs_and_devices(fake_root):
    h = HostRoot(fake_root)
    c = gpu.discover_nvidia(h, P({"gpu_extra_libs": ["libnl-3.so"],
                                "gpu_exclude_libs": ["libnvidia-ptxjitcompiler.so"],
                                "gpu_extra_devices": ["/dev/infiniband/uverbs*", "/dev/none"]}),
                            ENV)
    d = dsts(c)
    assert f"{LIBS}/libnl-3.so.200" in d
    assert f"{LIBS}/libnvidia-ptxjitcompiler.so.1" not in d
    assert "/dev/infiniband/uverbs0" in d
    assert any("/dev/none" in w for w in c.warnings)


def test_wrong_machine_and_32bit_libraries_skipped(tmp_path, fake_root):
    """Cache entries for another ELF machine or for 32-bit are never bound."""
    root = tmp_path / "r"
    (root / "dev").mkdir(parents=True)
    os.mknod(root / "dev/nvidiactl", 0o666 | 0o020000, os.makedev(195, 255))
    (root / "lib").mkdir()
    real = Path(HostRoot(fake_root).realpath(f"{LIBDIR}/libcuda.so.1")).read_bytes()
    foreign = bytearray(real)
    struct.pack_into("<H", foreign, 18, 183 if elf.host_machine() != 183 else 62)
    (root / "lib/libcuda.so.1").write_bytes(foreign)
    (root / "lib/libnvidia-ml.so.1").write_bytes(make_elf(32, "<", 3, soname="libnvidia-ml.so.1"))
    (root / "lib/libnvidia-cfg.so.1").write_bytes(b"not an ELF")
    f64, _ = ldcache.host_flags()
    (root / "etc").mkdir()
    (root / "etc/ld.so.cache").write_bytes(make_cache([
        ("libcuda.so.1", f64, "/lib/libcuda.so.1", 0),
        ("libnvidia-ml.so.1", 0x0003, "/lib/libnvidia-ml.so.1", 0),
        ("libnvidia-cfg.so.1", f64, "/lib/libnvidia-cfg.so.1", 0)]))
    c = gpu.discover_nvidia(HostRoot(str(root)), P({}), ENV)
    assert not [b for b in c.binds if b[1].startswith(LIBS)]
    assert any("libcuda.so.1" in n and "another machine" in n for n in c.notes)
    assert any("libnvidia-cfg.so.1" in w and "not an ELF" in w for w in c.warnings)
    assert any("libnvidia-ml.so not found" in w for w in c.warnings)
    assert "LD_LIBRARY_PATH" not in c.prepend


@pytest.mark.parametrize("garbage", [b"", b"glibc-ld.so.cache1.1\xff\xff", os.urandom(2000)])
def test_garbage_host_cache_no_crash(scratch_root, garbage):
    (scratch_root / "etc/ld.so.cache").write_bytes(garbage)
    c = discover(P({}), ENV, nv=True, rocm=True, ib=True, host=HostRoot(str(scratch_root)))
    assert "/dev/nvidia0" in dsts(c) and "/dev/kfd" in dsts(c) and "/dev/infiniband" in dsts(c)
    assert not [b for b in c.binds if b[1].startswith(LIBS)]
    assert any("cannot read the host's library cache" in w for w in c.warnings)


# ------------------------------------------------------------------ ROCm

def test_rocm_auto_binds_kfd_dri_libs_tools(fake_root):
    c = gpu.discover_rocm(HostRoot(fake_root), P({}), ENV)
    d = dsts(c)
    assert "/dev/kfd" in d and bind_of(c, "/dev/dri")[0] == f"{fake_root}/dev/dri"
    assert bind_of(c, f"{LIBS}/libhsa-runtime64.so.1")[0] == \
        f"{fake_root}/opt/rocm-6.0.0/lib/libhsa-runtime64.so.1.12.60000"
    assert f"{LIBS}/libamd_comgr.so.2" in d
    assert bind_of(c, f"{BINS}/rocm-smi")[0] == f"{fake_root}/opt/rocm-6.0.0/bin/rocm-smi"
    assert c.env == {} and not c.hide and not c.warnings
    assert not [x for x in d if "nvidia" in x]


def test_rocm_visible_devices(fake_root):
    c = gpu.discover_rocm(HostRoot(fake_root), P({}), dict(ENV, ROCR_VISIBLE_DEVICES="1"))
    d = dsts(c)
    assert "/dev/dri/renderD129" in d and "/dev/dri" not in d and "/dev/dri/renderD128" not in d
    assert c.hide == ["/dev/dri/renderD128"]
    assert c.env == {"ROCR_VISIBLE_DEVICES": "0"}


def test_rocm_topology_order_decides(scratch_root):
    topo = scratch_root / "sys/class/kfd/kfd/topology/nodes"
    (topo / "1/properties").write_text("simd_count 256\ndrm_render_minor 129\n")
    (topo / "2/properties").write_text("simd_count 256\ndrm_render_minor 128\n")
    c = gpu.discover_rocm(HostRoot(str(scratch_root)), P({}), dict(ENV, ROCR_VISIBLE_DEVICES="0"))
    assert "/dev/dri/renderD129" in dsts(c) and c.hide == ["/dev/dri/renderD128"]
    shutil.rmtree(scratch_root / "sys")               # no topology: render nodes in order
    c = gpu.discover_rocm(HostRoot(str(scratch_root)), P({}), dict(ENV, ROCR_VISIBLE_DEVICES="0"))
    assert "/dev/dri/renderD128" in dsts(c)


# -------------------------------------------------------------------- IB

def test_ib_binds_devices_rdma_core_providers_and_config(fake_root):
    c = ib.discover_ib(HostRoot(fake_root), P({"ib_memlock_min": 0}), ENV)
    assert bind_of(c, "/dev/infiniband") == (f"{fake_root}/dev/infiniband", "/dev/infiniband",
                                             False, "infiniband: RDMA devices")
    libdir = f"{fake_root}{LIBDIR}"
    assert bind_of(c, f"{LIBS}/libibverbs.so.1")[0] == f"{libdir}/libibverbs.so.1.14.50.0"
    assert bind_of(c, f"{LIBS}/librdmacm.so.1")[0] == f"{libdir}/librdmacm.so.1.3.50.0"
    assert bind_of(c, f"{LIBS}/libmlx5.so.1")[0] == f"{libdir}/libmlx5.so.1.24.50.0"
    assert bind_of(c, f"{LIBS}/libmlx5-rdmav34.so")[0] == f"{libdir}/libmlx5.so.1.24.50.0"
    assert bind_of(c, f"{LIBS}/libnl-3.so.200")[0] == f"{libdir}/libnl-3.so.200.26.0"
    assert bind_of(c, "/etc/libibverbs.d") == (f"{fake_root}/etc/libibverbs.d",
                                               "/etc/libibverbs.d", True,
                                               "infiniband: verbs provider configuration")
    assert not [b for b in c.binds if b[1].endswith(("libc.so.6", "libgcc_s.so.1"))]
    assert c.prepend == {"LD_LIBRARY_PATH": [LIBS]} and c.warnings == []
    assert any("uverbs0" in n and "rdma_cm" in n for n in c.notes)


def test_ib_policy_env_and_off(fake_root):
    h = HostRoot(fake_root)
    c = ib.discover_ib(h, P({"ib_env": {"UCX_NET_DEVICES": "mlx5_0:1", "FI_PROVIDER": "verbs",
                                      "bad name": "x"}, "ib_memlock_min": 0}), ENV)
    assert c.env == {"UCX_NET_DEVICES": "mlx5_0:1", "FI_PROVIDER": "verbs"}
    assert any("'bad name'" in w for w in c.warnings)
    assert not ib.discover_ib(h, P({"infiniband": "off"}), ENV)
    assert ib.discover_ib(h, P({"infiniband": "off", "ib_memlock_min": 0}), ENV, force=True)


def test_ib_absolute_provider_path_in_driver_file(scratch_root):
    (scratch_root / "etc/libibverbs.d/mlx4.driver").write_text("driver /usr/lib64/libibverbs/libmlx4\n")
    d = scratch_root / "usr/lib64/libibverbs"
    d.mkdir(parents=True)
    (d / "libmlx4-rdmav34.so").write_bytes(make_elf(soname="libmlx4.so.1"))
    c = ib.discover_ib(HostRoot(str(scratch_root)), P({"ib_memlock_min": 0}), ENV)
    assert bind_of(c, "/usr/lib64/libibverbs/libmlx4-rdmav34.so")[0] == \
        str(d / "libmlx4-rdmav34.so")


def test_ib_memlock_warning(fake_root):
    soft, hard = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    resource.setrlimit(resource.RLIMIT_MEMLOCK, (1 << 20, hard))
    try:
        c = ib.discover_ib(HostRoot(fake_root), P({}), ENV)
    finally:
        resource.setrlimit(resource.RLIMIT_MEMLOCK, (soft, hard))
    w = [x for x in c.warnings if "locked-memory" in x]
    assert len(w) == 1 and "1 MiB" in w[0] and "ulimit -l" in w[0]
    inf = resource.RLIM_INFINITY
    assert ib.memlock_warning(64 << 20, (inf, inf)) is None
    assert ib.memlock_warning(64 << 20, (128 << 20, inf)) is None
    assert ib.memlock_warning(0, (1, 1)) is None
    assert "ulimit -l unlimited" in ib.memlock_warning(64 << 20, (8 << 20, inf))
    assert "ulimit -l 131072" in ib.memlock_warning(64 << 20, (8 << 20, 128 << 20))
    assert "administrators" in ib.memlock_warning(64 << 20, (8 << 20, 8 << 20))


# ----------------------------------------------------- everything together

def test_discover_everything_merges(fake_root):
    c = discover(P({"ib_memlock_min": 0}), dict(ENV, CUDA_VISIBLE_DEVICES="2"),
                 host=HostRoot(fake_root))
    d = dsts(c)
    assert len(d) == len(set(d))
    assert {"/dev/nvidia2", "/dev/kfd", "/dev/dri", "/dev/infiniband"} <= set(d)
    assert c.prepend == {"LD_LIBRARY_PATH": [LIBS], "PATH": [BINS]}
    assert c.env == {"CUDA_VISIBLE_DEVICES": "0"} and not c.warnings


def test_validate_policy():
    assert validate_policy({}) == []
    assert validate_policy({"gpu": "auto", "gpu_devices": "all", "infiniband": False,
                            "gpu_extra_libs": ["libx.so"], "ib_env": {"UCX_TLS": "rc"},
                            "ib_memlock_min": 0, "gpu_extra_devices": ["/dev/nvidia-fs*"]}) == []
    errs = "\n".join(validate_policy({
        "gpu": "yes", "gpu_devices": 3, "infiniband": "maybe", "gpu_extra_libs": "libx.so",
        "gpu_extra_devices": ["/tmp/x"], "ib_env": {"1X": "a", "OK": ["list"]},
        "ib_memlock_min": -1, "ib_extra_libs": [""]}))
    for key in ("gpu:", "gpu_devices:", "infiniband:", "gpu_extra_libs:", "gpu_extra_devices:",
                "ib_env: '1X'", "ib_env: OK", "ib_memlock_min:", "ib_extra_libs:"):
        assert key in errs


def test_lists_follow_apptainer():
    assert L.NVIDIA_BINARIES[0] == "nvidia-smi" and len(L.NVIDIA_BINARIES) == 5
    assert {"libcuda.so", "libnvidia-ml.so", "libnvidia-ptxjitcompiler.so",
            "libnvidia-nvvm.so", "libcudadebugger.so"} <= set(L.NVIDIA_LIBS)
    assert {"libhsa-runtime64.so", "libamd_comgr.so"} <= set(L.ROCM_LIBS)
    m = L.matcher(["libcuda.so", "libEGL.so"])
    assert m("libcuda.so.1") and m("libcuda.so") and not m("libcudart.so.12")
    assert not m("libEGL_nvidia.so.0") and m("libEGL.so.1")


def test_hot_path_imports_stay_small(fake_root):
    code = ("import sys; from hpcimage.host import discover, HostRoot; "
            f"c = discover(None, {{'PATH': '/usr/bin'}}, nv=True, rocm=True, ib=True, "
            f"host=HostRoot({fake_root!r})); "
            "print(' '.join(sorted(sys.modules)))")
    r = subprocess.run([PY, "-I", "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    mods = set(r.stdout.split())
    for heavy in ("re", "subprocess", "collections", "json", "click", "yaml", "jinja2",
                  "fnmatch", "glob", "ctypes", "hpcimage.runtime"):
        assert heavy not in mods, heavy


# -------------------------------------------------------- end to end (user)

PROBE_C = r"""
#include <dlfcn.h>
#include <stdio.h>
/* probe SONAME [SYMBOL...]: dlopen SONAME by name (the loader searches
   LD_LIBRARY_PATH), call each int SYMBOL(int *) and print its out value. */
int main(int argc, char **argv) {
    if (argc < 2) return 64;
    void *h = dlopen(argv[1], RTLD_NOW);
    if (!h) { printf("dlopen-failed %s\n", dlerror()); return 2; }
    printf("loaded %s\n", argv[1]);
    for (int i = 2; i < argc; i++) {
        int (*f)(int *) = (int (*)(int *))dlsym(h, argv[i]);
        if (!f) { printf("nosym %s\n", argv[i]); return 3; }
        int v = -1;
        int rc = f(&v);
        printf("%s=%d rc=%d\n", argv[i], v, rc);
    }
    return 0;
}
"""


@pytest.fixture(scope="session")
def probe_dir():
    d = tempfile.mkdtemp(prefix="gpuprobe-", dir=_base())
    (Path(d) / "probe.c").write_text(PROBE_C)
    subprocess.run(["gcc", "-O1", "-o", f"{d}/probe", f"{d}/probe.c", "-ldl"], check=True)
    subprocess.run(["chmod", "-R", "a+rX", d], check=True)
    yield d
    shutil.rmtree(d, ignore_errors=True)


def image_exec(user, image, host_root, probe_dir, *opts_and_cmd, env=None):
    e = {"HPCIMAGE_IMAGE": str(image), "HPCIMAGE_HOST_ROOT": str(host_root)}
    e.update(env or {})
    return user.run(runtime_argv("image-exec", "-B", f"{probe_dir}:/mnt/probe", *opts_and_cmd),
                    env=e, timeout=60)


def test_e2e_nv_devices_library_and_smi(user, debian_dir, fake_root, probe_dir):
    r = image_exec(user, debian_dir, fake_root, probe_dir, "--nv", "sh", "-c",
                   "ls -d /dev/nvidia*; /mnt/probe/probe libcuda.so.1 cuInit cuDeviceGetCount; "
                   "nvidia-smi -L; echo LD=$LD_LIBRARY_PATH")
    assert r.returncode == 0, r.stderr
    out = r.stdout.split("\n")
    for n in ("nvidiactl", "nvidia-uvm", "nvidia-uvm-tools", "nvidia-modeset", "nvidia-caps",
              "nvidia0", "nvidia1", "nvidia2", "nvidia3"):
        assert f"/dev/{n}" in out
    assert "loaded libcuda.so.1" in out and "cuInit=-1 rc=0" in out
    assert "cuDeviceGetCount=4 rc=0" in out
    assert sum(1 for ln in out if ln.startswith("GPU ")) == 4
    assert any(ln.startswith("LD=/.singularity.d/libs") for ln in out)


def test_e2e_nv_visible_devices_renumbered(user, debian_dir, fake_root, probe_dir):
    r = image_exec(user, debian_dir, fake_root, probe_dir, "--nv", "sh", "-c",
                   "ls -d /dev/nvidia[0-9]*; echo CVD=$CUDA_VISIBLE_DEVICES; "
                   "/mnt/probe/probe libcuda.so.1 cuDeviceGetCount; nvidia-smi -L",
                   env={"CUDA_VISIBLE_DEVICES": "3,1"})
    assert r.returncode == 0, r.stderr
    out = r.stdout.split("\n")
    assert [ln for ln in out if ln.startswith("/dev/nvidia")] == ["/dev/nvidia1", "/dev/nvidia3"]
    assert "CVD=1,0" in out and "cuDeviceGetCount=2 rc=0" in out
    assert sum(1 for ln in out if ln.startswith("GPU ")) == 2


def test_e2e_ib(user, debian_dir, fake_root, probe_dir):
    r = image_exec(user, debian_dir, fake_root, probe_dir, "--ib", "sh", "-c",
                   "ls /dev/infiniband; /mnt/probe/probe libibverbs.so.1 ibv_get_device_list; "
                   "/mnt/probe/probe libmlx5-rdmav34.so; /mnt/probe/probe librdmacm.so.1; "
                   "cat /etc/libibverbs.d/mlx5.driver")
    assert r.returncode == 0, r.stderr
    out = r.stdout.split("\n")
    for n in ("uverbs0", "rdma_cm", "umad0", "issm0"):
        assert n in out
    assert "ibv_get_device_list=1 rc=0" in out
    assert "loaded libmlx5-rdmav34.so" in out and "loaded librdmacm.so.1" in out
    assert "driver mlx5" in out


def test_e2e_rocm(user, debian_dir, fake_root, probe_dir):
    r = image_exec(user, debian_dir, fake_root, probe_dir, "--rocm", "sh", "-c",
                   "ls -d /dev/kfd /dev/dri/renderD*; "
                   "/mnt/probe/probe libhsa-runtime64.so.1 hsa_stub_agents; rocm-smi",
                   env={"ROCR_VISIBLE_DEVICES": "1"})
    assert r.returncode == 0, r.stderr
    out = r.stdout.split("\n")
    assert "/dev/kfd" in out and "/dev/dri/renderD129" in out and "/dev/dri/renderD128" not in out
    assert "hsa_stub_agents=1 rc=0" in out and "fake rocm-smi: 1 GPU(s)" in out


def test_e2e_auto_policy_binds_on_gpu_host(user, debian_dir, fake_root, probe_dir):
    r = image_exec(user, debian_dir, fake_root, probe_dir, "--dry-run", "true")
    assert r.returncode == 0, r.stderr
    assert "/.singularity.d/libs/libcuda.so.1" in r.stdout and "/dev/nvidia0" in r.stdout


def test_e2e_auto_binds_nothing_without_hardware(user, debian_dir, nohw_root, probe_dir):
    r = image_exec(user, debian_dir, nohw_root, probe_dir, "--dry-run", "true")
    assert r.returncode == 0, r.stderr
    plan = "\n".join(ln for ln in r.stdout.splitlines() if not ln.startswith("# note: "))
    for word in ("nvidia", "libcuda", ".singularity.d/libs", "/dev/kfd", "infiniband"):
        assert word not in plan
    # the discovery's notes say why (issue 13: they reach --dry-run)
    assert "# note: gpu=auto: no /dev/nvidiactl on the host, NVIDIA support off\n" in r.stdout
    r = image_exec(user, debian_dir, nohw_root, probe_dir, "sh", "-c",
                   "ls /.singularity.d/libs 2>&1; echo LD=$LD_LIBRARY_PATH; "
                   "/mnt/probe/probe libcuda.so.1")
    assert "LD=\n" in r.stdout or "LD=" in r.stdout.split("\n")
    assert "loaded libcuda.so.1" not in r.stdout and "dlopen-failed" in r.stdout
