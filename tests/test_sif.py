"""SIF: the reader against siftool's golden output, corrupt input, the writer, conversions.

The conformance corpus (the sylabs/sif test images and siftool's expected output) is
read from ../shared/testdata/sif beside the checkout, or $HPCIMAGE_TESTDATA/sif; the
golden tests skip with a reason where it is absent. Everything else builds its own
images.
"""
import io
import json
import os
import re
import shutil
import stat
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hpcimage.errors import HpcimageError, UsageError
from hpcimage.image import sif

REPO = Path(__file__).resolve().parents[1]


def _sif_testdata():
    env = os.environ.get("HPCIMAGE_TESTDATA")
    for base in ([Path(env)] if env else []) + [REPO.parent / "shared" / "testdata"]:
        for cand in (base / "sif", base):
            if (cand / "images").is_dir() and (cand / "golden").is_dir():
                return cand
    return None


SIF_DATA = _sif_testdata()
NO_DATA = ("SIF conformance corpus not found (expected ../shared/testdata/sif beside the "
           "checkout, or $HPCIMAGE_TESTDATA/sif)")
HAVE_SQUASHFS_TOOLS = bool(shutil.which("mksquashfs") and shutil.which("unsquashfs"))
needs_squashfs_tools = pytest.mark.skipif(
    not HAVE_SQUASHFS_TOOLS, reason="squashfs-tools (mksquashfs, unsquashfs) not installed")


@pytest.fixture(autouse=True)
def no_leaks_after():
    """Overrides conftest's squashfuse leak check: nothing here mounts anything, and
    squashfuse processes of other test runs on the machine must not fail these tests."""
    yield


def kebab(name):
    """Golden test name -> image name: OneGroupSignedPGP -> one-group-signed-pgp."""
    return re.sub(r"(?<=[a-z0-9])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])", "-", name).lower()


def goldens(kind):
    if SIF_DATA is None:
        return [pytest.param(None, marks=pytest.mark.skip(reason=NO_DATA), id="no-corpus")]
    names = sorted(p.stem for p in (SIF_DATA / "golden" / kind).glob("*.golden"))
    assert names, f"no goldens in {SIF_DATA / 'golden' / kind}"
    return names


# siftool info goldens: which object of which image (the corpus README).
INFO_OBJECTS = {
    "Time": ("one-object-time", 1),
    "GenericJSON": ("one-object-generic-json", 1),
    "CryptMessage": ("one-object-crypt-message", 1),
    "SBOM": ("one-object-sbom", 1),
    "OCIRootIndex": ("one-object-oci-root-index", 1),
    "OCIBlob": ("one-object-oci-blob", 1),
    "DataPartitionRaw": ("two-groups-signed-pgp", 1),
    "DataPartitionSquashFS": ("two-groups-signed-pgp", 2),
    "DataPartitionEXT3": ("two-groups-signed-pgp", 3),
    "DataSignature": ("two-groups-signed-pgp", 4),
}


def hpcimage(*args):
    """Run `hpcimage ARGS` in this process: (exit status, stdout bytes, stderr text)."""
    from hpcimage.cli import main

    out, err = io.BytesIO(), io.BytesIO()
    so = io.TextIOWrapper(out, encoding="utf-8", write_through=True)
    se = io.TextIOWrapper(err, encoding="utf-8", write_through=True)
    saved = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = so, se
    code = None
    try:
        main([str(a) for a in args])
    except SystemExit as e:
        code = e.code
    finally:
        so.flush()
        se.flush()
        sys.stdout, sys.stderr = saved
    return code, out.getvalue(), err.getvalue().decode()


def assert_usage_error(args, *fragments):
    code, out, err = hpcimage(*args)
    assert code == 2, (code, out, err)
    assert out == b""
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("hpcimage: error: "), err
    for frag in fragments:
        assert frag in lines[0], (frag, lines[0])
    return lines[0]


# ------------------------------------------------------------------ golden output

@pytest.mark.parametrize("name", goldens("TestApp_List"))
def test_list_golden(name):
    image = SIF_DATA / "images" / f"{kebab(name)}.sif"
    code, out, err = hpcimage("sif", "list", image)
    assert (code, err) == (0, "")
    assert out == (SIF_DATA / "golden" / "TestApp_List" / f"{name}.golden").read_bytes()


@pytest.mark.parametrize("name", goldens("TestApp_Header"))
def test_header_golden(name):
    image = SIF_DATA / "images" / f"{kebab(name)}.sif"
    code, out, err = hpcimage("sif", "header", image)
    assert (code, err) == (0, "")
    assert out == (SIF_DATA / "golden" / "TestApp_Header" / f"{name}.golden").read_bytes()


@pytest.mark.parametrize("name", goldens("TestApp_Info"))
def test_info_golden(name):
    image, obj = INFO_OBJECTS[name]
    code, out, err = hpcimage("sif", "info", obj, SIF_DATA / "images" / f"{image}.sif")
    assert (code, err) == (0, "")
    assert out == (SIF_DATA / "golden" / "TestApp_Info" / f"{name}.golden").read_bytes()


@pytest.mark.parametrize("name", goldens("TestApp_Dump"))
def test_dump_golden(name):
    obj = {"One": 1, "Two": 2}[name]
    code, out, err = hpcimage("sif", "dump", obj, SIF_DATA / "images" / "one-group.sif")
    assert (code, err) == (0, "")
    assert out == (SIF_DATA / "golden" / "TestApp_Dump" / f"{name}.golden").read_bytes()


@pytest.mark.skipif(SIF_DATA is None, reason=NO_DATA)
def test_every_corpus_image_opens_and_every_golden_is_used():
    images = sorted((SIF_DATA / "images").glob("*.sif"))
    assert len(images) >= 20
    for p in images:
        img = sif.SifImage.open(p)
        assert img.header.descriptors_total == 48
        for d in img.descriptors:
            sif.format_info(img, d.id)
    used = {kebab(n) for k in ("TestApp_List", "TestApp_Header")
            for n in goldens(k)}
    assert used <= {p.stem for p in images}
    assert set(goldens("TestApp_Info")) == set(INFO_OBJECTS)


@pytest.mark.skipif(SIF_DATA is None, reason=NO_DATA)
def test_reader_fields_of_corpus_image():
    img = sif.SifImage.open(SIF_DATA / "images" / "two-groups-signed-pgp.sif")
    h = img.header
    assert (h.magic, h.version, h.arch_name) == (sif.MAGIC, sif.VERSION, "386")
    assert (h.descriptors_free, h.descriptors_total, h.descriptors_offset) == (43, 48, 4096)
    assert (h.descriptors_size, h.data_offset) == (48 * 585, 32176)
    assert [d.id for d in img.descriptors] == [1, 2, 3, 4, 5]
    raw, sq, ext3, sig1, sig2 = img.descriptors
    assert (raw.fstype, raw.parttype, raw.arch_name) == (sif.FS_RAW, sif.PART_SYSTEM, "386")
    assert sq.is_primary_partition and sq.fstype == sif.FS_SQUASH
    assert (sq.offset, sq.size, sq.size_with_padding) == (36864, 4096, 8188)
    assert (ext3.group_id, ext3.fstype_name, ext3.arch_name) == (2, "Ext3", "amd64")
    assert sig1.data_type == sif.DATA_SIGNATURE and sig1.hash_type_name == "SHA-256"
    assert sig1.linked_id == (1, True) and sig1.group_id == 0
    assert sig1.fingerprint.hex().upper() == "12045C8C0B1004D058DE4BEDA20C27EE7FF7BA84"
    assert img.primary_partition() is sq
    assert sif.primary_squashfs(img.path) == (36864, 4096)
    assert img.read_object(2)[:4] == b"hsqs"


# ------------------------------------------------------------ Go formatting helpers

@pytest.mark.parametrize("sec,text", [
    (1590175859, "2020-05-22 19:30:59 +0000 UTC"),
    (0, "1970-01-01 00:00:00 +0000 UTC"),
    (-1, "1969-12-31 23:59:59 +0000 UTC"),
    (951782400, "2000-02-29 00:00:00 +0000 UTC"),
    (sif.GO_ZERO_TIME, "0001-01-01 00:00:00 +0000 UTC"),
    (2**63 - 1, "292277026596-12-04 15:30:07 +0000 UTC"),
])
def test_go_time(sec, text):
    assert sif.go_time(sec) == text


@pytest.mark.parametrize("size,text", [
    (0, "0 B"), (1023, "1023 B"), (1024, "1 KiB"), (1535, "1 KiB"), (1536, "2 KiB"),
    (28080, "27 KiB"), (-1536, "-2 KiB"), (3 << 30, "3 GiB"), (2**63 - 1, "8 EiB"),
])
def test_readable_size(size, text):
    assert sif.readable_size(size) == text


def test_tabwriter_like_go():
    assert sif.go_tabwrite(b"a:\t1\nlong key:\t2\n", 1) == b"a:        1\nlong key: 2\n"
    # a line without a tab ends the column block, as in Go
    assert sif.go_tabwrite(b"a:\t1\nplain\nlonger:\t2\n", 1) == b"a: 1\nplain\nlonger: 2\n"
    assert sif.go_tabwrite(b"\tk:\tv\n\tkey:\tw\n", 2) == b"  k:    v\n  key:  w\n"
    # widths count runes, not bytes; 0xff-escaped text is not split at tabs
    assert sif.go_tabwrite("é:\tx\nab:\ty\n".encode(), 1) == "é:  x\nab: y\n".encode()
    assert sif.go_tabwrite(b"\xffa\tb\xff:\tx\n", 1) == b"\xffa\tb\xff: x\n"


# ---------------------------------------------------------------------- the writer

def fake_squashfs(path, size=10000, sparse=False):
    """A file that starts like SquashFS: enough for the SIF reader and writer."""
    with open(path, "wb") as f:
        f.write(b"hsqs")
        if sparse:
            f.truncate(size)
        else:
            f.write(bytes(range(256)) * ((size - 4) // 256) + b"x" * ((size - 4) % 256))
    return path


@pytest.fixture
def written(tmp_path):
    """A SIF made by write_sif: deffile (id 1), labels (id 2), SquashFS (id 3)."""
    sq = fake_squashfs(tmp_path / "root.sqfs")
    out = tmp_path / "image.sif"
    sif.write_sif(out, sq, deffile="Bootstrap: scratch\n", labels={"a": "b"}, arch="amd64")
    return out


def test_write_sif_layout(tmp_path, written):
    before = int(time.time()) - 2
    img = sif.SifImage.open(written)
    h = img.header
    assert h.launch_script.rstrip(b"\0") == b"#!/usr/bin/env run-singularity\n"
    assert (h.magic, h.version, h.arch) == (sif.MAGIC, b"01\0", b"02\0")
    assert (h.descriptors_total, h.descriptors_free) == (48, 45)
    assert (h.descriptors_offset, h.descriptors_size, h.data_offset) == (4096, 28080, 32176)
    assert before <= h.created_at == h.modified_at <= time.time() + 1
    assert (h.id[6] >> 4, h.id[8] >> 6) == (4, 2)          # random (v4) UUID
    size = written.stat().st_size
    assert h.data_offset + h.data_size == size
    deffile, labels, part = img.descriptors
    assert [d.id for d in img.descriptors] == [1, 2, 3]
    assert [d.data_type_name for d in img.descriptors] == ["Def.FILE", "JSON.Labels", "FS"]
    assert all(d.group_id == 1 and d.linked_id == (0, False) for d in img.descriptors)
    assert (deffile.offset, deffile.size, deffile.size_with_padding) == (32176, 19, 19)
    assert (labels.offset, labels.size_with_padding) == (32176 + 19, labels.size)
    assert json.loads(img.read_object(2)) == {"a": "b"}
    assert img.read_object(1) == b"Bootstrap: scratch\n"
    assert part.offset % 4096 == 0 and part.offset >= labels.end
    assert part.size_with_padding == part.offset - labels.end + part.size
    assert part.end == size and part.size == 10000
    assert (part.fstype, part.parttype, part.arch_name) == \
        (sif.FS_SQUASH, sif.PART_PRIMARY_SYSTEM, "amd64")
    assert img.read_object(3) == (tmp_path / "root.sqfs").read_bytes()
    assert sif.primary_squashfs(written) == (part.offset, part.size)
    assert os.stat(written).st_mode & 0o111        # executable, like the sif library's
    assert sorted(os.listdir(tmp_path)) == ["image.sif", "root.sqfs"]


def test_write_sif_list_and_header_show_what_siftool_would(written):
    img = sif.SifImage.open(written)
    part = img.descriptors[2]
    code, out, err = hpcimage("sif", "list", written)
    assert code == 0
    rows = out.decode().splitlines()[3:]
    assert rows[0] == "1    |1       |NONE    |32176-32195               |Def.FILE"
    assert rows[1].startswith("2    |1       |NONE    |32195-") and rows[1].endswith("|JSON.Labels")
    pos = f"|{part.offset}-{part.end} "
    assert rows[2] == f"3    |1       |NONE    {pos:<26} |FS (Squashfs/*System/amd64)"
    code, out, err = hpcimage("sif", "header", written)
    text = out.decode()
    assert "Launch Script:        #!/usr/bin/env run-singularity\n" in text
    assert "Primary Architecture: amd64\n" in text
    assert f"ID:                   {img.header.uuid}\n" in text
    assert "Descriptors Free:     45\n" in text and "Data Offset:          32176\n" in text
    code, out, err = hpcimage("sif", "info", 3, written)
    assert "  Filesystem Type:  Squashfs\n  Partition Type:   *System\n" in out.decode()


def test_write_sif_minimal_and_fresh_ids(tmp_path):
    sq = fake_squashfs(tmp_path / "a.sqfs")
    a = sif.write_sif(tmp_path / "a.sif", sq)
    b = sif.write_sif(tmp_path / "b.sif", sq)
    assert [d.data_type for d in a.descriptors] == [sif.DATA_PARTITION]
    assert a.descriptors[0].offset == 32768 and a.header.descriptors_free == 47
    assert a.header.arch_name == sif.host_goarch()
    assert a.header.id != b.header.id


def test_write_sif_streams_and_keeps_holes(tmp_path):
    sq = fake_squashfs(tmp_path / "big.sqfs", size=256 << 20, sparse=True)
    out = tmp_path / "big.sif"
    sif.write_sif(out, sq)
    st = out.stat()
    assert st.st_size == 32768 + (256 << 20)
    assert st.st_blocks * 512 < 4 << 20, "the hole was written out"
    img = sif.SifImage.open(out)
    chunks = []
    img.copy_object(1, lambda b: chunks.append(len(b)))
    assert sum(chunks) == 256 << 20 and max(chunks) <= 1 << 20


def test_write_sif_refuses_non_squashfs_and_leaves_nothing(tmp_path):
    (tmp_path / "x").write_bytes(b"not squashfs")
    with pytest.raises(UsageError, match="not a SquashFS image"):
        sif.write_sif(tmp_path / "o.sif", tmp_path / "x")
    with pytest.raises(UsageError, match="unknown architecture"):
        sif.write_sif(tmp_path / "o.sif", fake_squashfs(tmp_path / "s"), arch="vax")
    assert sorted(os.listdir(tmp_path)) == ["s", "x"]


def test_write_sif_failure_midway_leaves_old_file(tmp_path, monkeypatch):
    sq = fake_squashfs(tmp_path / "s.sqfs")
    out = tmp_path / "o.sif"
    out.write_bytes(b"old")

    def boom(*a):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(sif, "_copy_sparse", boom)
    with pytest.raises(HpcimageError, match="No space left"):
        sif.write_sif(out, sq)
    assert out.read_bytes() == b"old"
    assert sorted(os.listdir(tmp_path)) == ["o.sif", "s.sqfs"]


def test_open_reads_only_header_and_descriptors(tmp_path, monkeypatch):
    """`inspect` of a 1 GiB SIF costs what it costs on a small one."""
    out = tmp_path / "huge.sif"
    sif.write_sif(out, fake_squashfs(tmp_path / "h.sqfs", size=1 << 30, sparse=True))
    read = []
    real = os.pread

    def counting(fd, n, off):
        read.append(n)
        return real(fd, n, off)
    monkeypatch.setattr(os, "pread", counting)
    sif.SifImage.open(out)
    assert sum(read) == 128 + 48 * 585
    read.clear()
    assert sif.primary_squashfs(out)[1] == 1 << 30
    assert sum(read) == 128 + 48 * 585 + 4


def test_sif_module_is_stdlib_only_and_cheap():
    code = ("import sys, hpcimage.image.sif as s; s.SifImage; "
            "bad = [m for m in ('click', 'yaml', 'jinja2', 'psutil', 'json', 'datetime', "
            "'uuid', 'pkg_resources', 'subprocess') if m in sys.modules]; print(bad)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       cwd=REPO)            # -c: the checkout comes first on sys.path
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"


# ------------------------------------------------------------------- corrupt input

HDR = struct.Struct("<32s10s3s3s16s8q")
FIELD = {"ctime": 0, "mtime": 1, "free": 2, "total": 3, "descoff": 4, "descsize": 5,
         "dataoff": 6, "datasize": 7}


def set_header_field(path, name, value):
    with open(path, "r+b") as f:
        f.seek(64 + 8 * FIELD[name])
        f.write(struct.pack("<q", value))


def set_descriptor(path, index, fmt, offset, *values):
    """Overwrite bytes of descriptor INDEX at OFFSET within it."""
    with open(path, "r+b") as f:
        f.seek(4096 + 585 * index + offset)
        f.write(struct.pack(fmt, *values))


D_ID, D_OFFSET, D_SIZE, D_EXTRA = 5, 17, 25, 201


@pytest.fixture
def corrupt(tmp_path, written):
    dst = tmp_path / "bad.sif"
    shutil.copy(written, dst)
    return dst


def test_corrupt_bad_magic(corrupt):
    with open(corrupt, "r+b") as f:
        f.seek(32)
        f.write(b"NOT_MAGIC")
    assert_usage_error(["sif", "list", corrupt], f"{corrupt}: not a SIF image (bad magic)")


def test_corrupt_not_sif_at_all(tmp_path):
    p = tmp_path / "text"
    p.write_text("hello\n")
    assert_usage_error(["sif", "header", p], "not a SIF image")


def test_corrupt_truncated_header(corrupt):
    os.truncate(corrupt, 100)
    assert_usage_error(["sif", "header", corrupt], f"{corrupt}: truncated SIF file: 100 bytes")


def test_corrupt_truncated_descriptor_table(corrupt):
    os.truncate(corrupt, 10000)
    assert_usage_error(["sif", "list", corrupt], "runs past the end of the file")


def test_corrupt_descriptor_table_past_end(corrupt):
    set_header_field(corrupt, "descoff", 1 << 40)
    assert_usage_error(["sif", "list", corrupt],
                       "descriptor table offset 1099511627776 is outside the file")


def test_corrupt_descriptor_table_too_small(corrupt):
    set_header_field(corrupt, "descsize", 585)
    assert_usage_error(["sif", "list", corrupt], "smaller than 48 descriptors need (28080)")


def test_corrupt_object_past_end(corrupt):
    set_descriptor(corrupt, 2, "<q", D_SIZE, 1 << 50)
    assert_usage_error(["sif", "list", corrupt], "object 3 (1125899906842624 bytes at",
                       "lies outside the file")


def test_corrupt_object_negative_offset(corrupt):
    set_descriptor(corrupt, 0, "<q", D_OFFSET, -5)
    assert_usage_error(["sif", "info", 1, corrupt], "object 1 (", "lies outside the file")


def test_corrupt_truncated_data(corrupt):
    os.truncate(corrupt, corrupt.stat().st_size - 1)
    assert_usage_error(["sif", "header", corrupt], "runs past the end of the file")


def test_corrupt_overlapping_objects(corrupt):
    set_descriptor(corrupt, 1, "<q", D_OFFSET, 32180)      # labels inside the deffile
    assert_usage_error(["sif", "list", corrupt], "objects 1 (32176-32195) and 2 (32180-", "overlap")


def test_corrupt_object_over_descriptor_table(corrupt):
    set_descriptor(corrupt, 0, "<q", D_OFFSET, 4100)
    assert_usage_error(["sif", "list", corrupt], "object 1",
                       "overlaps the SIF header or descriptor table")


@pytest.mark.parametrize("total", [-1, 1 << 40, 70000])
def test_corrupt_absurd_descriptor_count(corrupt, total):
    set_header_field(corrupt, "total", total)
    assert_usage_error(["sif", "list", corrupt], f"absurd descriptor count {total}")


def test_corrupt_absurd_free_count(corrupt):
    set_header_field(corrupt, "free", 49)
    assert_usage_error(["sif", "header", corrupt], "absurd free descriptor count 49 (of 48)")


def test_corrupt_unsupported_version(corrupt):
    with open(corrupt, "r+b") as f:
        f.seek(42)
        f.write(b"02\0")
    assert_usage_error(["sif", "header", corrupt], "unsupported SIF version b'02'")


def test_corrupt_duplicate_ids(corrupt):
    set_descriptor(corrupt, 1, "<I", D_ID, 1)
    assert_usage_error(["sif", "list", corrupt], "two descriptors have object ID 1")


def test_corrupt_unknown_signature_hash(corrupt):
    set_descriptor(corrupt, 1, "<i", 0, sif.DATA_SIGNATURE)
    set_descriptor(corrupt, 1, "<i", D_EXTRA, 99)
    # list prints nothing for it (like siftool); info refuses
    code, out, _ = hpcimage("sif", "list", corrupt)
    assert code == 0 and out.decode().splitlines()[4].startswith("2    |1       |NONE    |32195-")
    assert "Signature" not in out.decode()
    assert_usage_error(["sif", "info", 2, corrupt], "object 2: unsupported signature hash type 99")


def test_primary_partition_not_squashfs(corrupt):
    set_descriptor(corrupt, 2, "<i", D_EXTRA, sif.FS_EXT3)
    with pytest.raises(UsageError, match=r"primary partition \(object 3\) is Ext3, not SquashFS"):
        sif.primary_squashfs(corrupt)
    set_descriptor(corrupt, 2, "<i", D_EXTRA, sif.FS_ENCRYPTED_SQUASH)
    with pytest.raises(UsageError, match="Encrypted squashfs, not SquashFS .encrypted SIF"):
        sif.primary_squashfs(corrupt)


def test_primary_partition_without_squashfs_superblock(corrupt):
    img = sif.SifImage.open(corrupt)
    with open(corrupt, "r+b") as f:
        f.seek(img.descriptors[2].offset)
        f.write(b"XXXX")
    with pytest.raises(UsageError, match="says SquashFS but has no SquashFS superblock"):
        sif.primary_squashfs(corrupt)


def test_no_primary_partition(corrupt):
    set_descriptor(corrupt, 2, "<i", D_EXTRA + 4, sif.PART_SYSTEM)
    with pytest.raises(UsageError, match="has no primary system partition"):
        sif.primary_squashfs(corrupt)


def test_missing_object_id_and_file(corrupt, tmp_path):
    assert_usage_error(["sif", "info", 7, corrupt], f"{corrupt}: no object with ID 7")
    assert_usage_error(["sif", "dump", 0, corrupt], "no object with ID 0")
    assert_usage_error(["sif", "list", tmp_path / "nope.sif"], "nope.sif: no such file")
    assert_usage_error(["sif", "list", tmp_path], "is a directory")


def test_cli_error_end_to_end(corrupt):
    """The real command line: one line on stderr, exit status 2, no traceback."""
    os.truncate(corrupt, 50)
    r = subprocess.run([sys.executable, "-m", "hpcimage.cli", "sif", "list", str(corrupt)],
                       capture_output=True, text=True, cwd=REPO,
                       env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert r.returncode == 2
    assert r.stdout == ""
    assert r.stderr == (f"hpcimage: error: {corrupt}: truncated SIF file: 50 bytes, "
                        f"the global header alone needs 128\n")


# -------------------------------------------------------------------- conversions

def make_tree(root):
    root.mkdir()
    (root / "bin").mkdir()
    (root / "bin" / "tool").write_text("#!/bin/sh\necho hi\n")
    (root / "bin" / "tool").chmod(0o755)
    (root / "etc").mkdir()
    (root / "etc" / "os-release").write_text("NAME=test\n")
    (root / "etc" / "secret").write_text("s")
    (root / "etc" / "secret").chmod(0o600)
    (root / "empty").mkdir()
    (root / "data.bin").write_bytes(os.urandom(300000))
    os.symlink("bin/tool", root / "link")
    os.symlink("/nonexistent", root / "dangling")
    meta = root / ".singularity.d"
    meta.mkdir()
    (meta / "Singularity").write_text("Bootstrap: scratch\n%runscript\n  echo hi\n")
    (meta / "labels.json").write_text('{"org.label": "value"}\n')
    (meta / "runscript").write_text("#!/bin/sh\nexec /bin/tool\n")
    (meta / "runscript").chmod(0o755)
    return root


def tree(root):
    """What must survive a conversion: names, types, modes, owners, contents, links."""
    out = {}
    for dirpath, dirs, files in os.walk(root):
        for name in dirs + files:
            p = os.path.join(dirpath, name)
            st = os.lstat(p)
            rel = os.path.relpath(p, root)
            if stat.S_ISLNK(st.st_mode):
                what = ("link", os.readlink(p))
            elif stat.S_ISDIR(st.st_mode):
                what = ("dir",)
            else:
                what = ("file", Path(p).read_bytes())
            out[rel] = (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) + what
    return out


@pytest.fixture
def src_tree(tmp_path):
    return make_tree(tmp_path / "src")


def build(*args):
    code, out, err = hpcimage("build", *args)
    assert code == 0, err
    return err


@needs_squashfs_tools
def test_build_dir_to_sif_to_sandbox_roundtrip(tmp_path, src_tree):
    out = tmp_path / "img.sif"
    build(out, src_tree)
    img = sif.SifImage.open(out)
    assert [d.data_type_name for d in img.descriptors] == ["Def.FILE", "JSON.Labels", "FS"]
    assert img.read_object(1) == (src_tree / ".singularity.d" / "Singularity").read_bytes()
    assert img.read_object(2) == (src_tree / ".singularity.d" / "labels.json").read_bytes()
    assert sif.primary_squashfs(out) == (32768, img.descriptors[2].size)
    assert img.primary_partition().arch_name == sif.host_goarch()
    box = tmp_path / "box"
    build("--sandbox", box, out)
    assert tree(box) == tree(src_tree)
    assert sorted(os.listdir(tmp_path)) == ["box", "img.sif", "src"]


@needs_squashfs_tools
def test_build_dir_to_squashfs_to_sif_to_squashfs(tmp_path, src_tree):
    sq = tmp_path / "img.sqfs"
    build(sq, src_tree)
    assert sq.read_bytes()[:4] == b"hsqs"
    s = tmp_path / "img.sif"
    build(s, sq)
    img = sif.SifImage.open(s)
    # the definition file and labels come out of the SquashFS image
    assert img.read_object(1) == (src_tree / ".singularity.d" / "Singularity").read_bytes()
    assert img.read_object(3) == sq.read_bytes()
    back = tmp_path / "back.sqfs"
    build(back, s)
    assert back.read_bytes() == sq.read_bytes()
    box = tmp_path / "box"
    build("--sandbox", box, back)
    assert tree(box) == tree(src_tree)


@needs_squashfs_tools
def test_build_dir_to_sandbox_and_sif_to_sif(tmp_path, src_tree):
    box = tmp_path / "box"
    build("--sandbox", box, src_tree)
    assert tree(box) == tree(src_tree)
    a = tmp_path / "a.sif"
    build(a, box)
    b = tmp_path / "b.sif"
    build(b, a)
    assert b.read_bytes() == a.read_bytes()


@needs_squashfs_tools
def test_build_refuses_to_overwrite(tmp_path, src_tree):
    out = tmp_path / "img.sif"
    out.write_bytes(b"precious")
    assert_usage_error(["build", out, src_tree], f"{out}: already exists (use --force")
    assert out.read_bytes() == b"precious"
    box = tmp_path / "box"
    box.mkdir()
    (box / "keep").write_text("x")
    assert_usage_error(["build", "--sandbox", box, src_tree], "already exists")
    assert os.listdir(box) == ["keep"]
    assert sorted(os.listdir(tmp_path)) == ["box", "img.sif", "src"]
    build("--force", out, src_tree)
    assert sif.primary_squashfs(out)
    build("--sandbox", "--force", box, out)
    assert tree(box) == tree(src_tree)
    assert sorted(os.listdir(tmp_path)) == ["box", "img.sif", "src"]


def test_build_bad_input(tmp_path, corrupt):
    (tmp_path / "junk").write_text("junk")
    assert_usage_error(["build", tmp_path / "o.sif", tmp_path / "junk"],
                       "not a directory, SquashFS image or SIF image")
    assert_usage_error(["build", tmp_path / "o.sif", tmp_path / "missing"], "no such file")
    assert_usage_error(["build", tmp_path / "o.img", corrupt], "cannot tell the image format")
    set_descriptor(corrupt, 2, "<i", D_EXTRA, sif.FS_EXT3)
    assert_usage_error(["build", tmp_path / "o.sqfs", corrupt], "is Ext3, not SquashFS")
    assert_usage_error(["build", "--sandbox", tmp_path / "o", corrupt], "is Ext3, not SquashFS")
    assert not any(n.startswith((".o", "o")) for n in os.listdir(tmp_path))


def test_build_failure_leaves_nothing(tmp_path, src_tree, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path / "nobin"))
    code, out, err = hpcimage("build", tmp_path / "o.sif", src_tree)
    assert code == 1 and "mksquashfs not found" in err
    code, out, err = hpcimage("build", "--sandbox", tmp_path / "box", src_tree)
    assert code == 1 and "cp not found" in err
    assert sorted(os.listdir(tmp_path)) == ["src"]
