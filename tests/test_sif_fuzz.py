"""Property test: a mutated SIF either parses or raises UsageError, quickly and cheaply.

Mutations of real SIF files (the conformance corpus when present, and images made by
write_sif): bit flips, truncations, header and descriptor fields overwritten with
hostile integers, runs of random bytes. For each, opening the image and everything
`hpcimage sif header|list|info` and the runtime's `primary_squashfs` do with it must
either succeed or raise UsageError; no other exception, no hang (hypothesis deadline),
no large allocation (tracemalloc peak), no read larger than the file.
"""
import os
import struct
import tempfile
import tracemalloc
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from hpcimage.errors import UsageError
from hpcimage.image import sif

REPO = Path(__file__).resolve().parents[1]
MAX_PEAK = 4 << 20      # bytes of Python allocations an open + format may make


@pytest.fixture(autouse=True)
def no_leaks_after():
    """Overrides conftest's squashfuse leak check: nothing here mounts anything."""
    yield


def _corpus_files():
    env = os.environ.get("HPCIMAGE_TESTDATA")
    bases = ([Path(env)] if env else []) + [REPO.parent / "shared" / "testdata"]
    for base in bases:
        for cand in (base / "sif" / "images", base / "images"):
            if cand.is_dir():
                return sorted(cand.glob("*.sif"))
    return []


def _made_images():
    """SIFs from our own writer, so the property runs without the corpus too."""
    with tempfile.TemporaryDirectory(prefix="hpcimage-sif-fuzz-") as d:
        d = Path(d)
        sq = d / "root.sqfs"
        sq.write_bytes(b"hsqs" + bytes(range(256)) * 20)
        sif.write_sif(d / "full.sif", sq, deffile="Bootstrap: scratch\n",
                      labels={"k": "v"}, arch="amd64")
        sif.write_sif(d / "bare.sif", sq, arch="arm64")
        return [(d / "full.sif").read_bytes(), (d / "bare.sif").read_bytes()]


CORPUS = [p.read_bytes() for p in _corpus_files()] + _made_images()
# Values that break naive readers: signs, powers of two around sizes and offsets.
HOSTILE = st.sampled_from([0, 1, -1, 48, 128, 585, 4096, 32176, 32768, 1 << 31, 1 << 32,
                           (1 << 63) - 1, -(1 << 63), 1 << 40, -4096, 28080, 28079])
INT64 = st.one_of(HOSTILE, st.integers(-(1 << 63), (1 << 63) - 1))


@st.composite
def mutated(draw):
    data = bytearray(draw(st.sampled_from(CORPUS)))
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(st.sampled_from(["flip", "truncate", "header", "descriptor", "bytes"]))
        if kind == "flip" and data:
            pos = draw(st.one_of(st.integers(0, min(len(data), 4096 + 585 * 6) - 1),
                                 st.integers(0, len(data) - 1)))
            data[pos] ^= 1 << draw(st.integers(0, 7))
        elif kind == "truncate":
            del data[draw(st.integers(0, len(data))):]
        elif kind == "header" and len(data) >= 128:
            field = draw(st.integers(0, 7))
            struct.pack_into("<q", data, 64 + 8 * field, draw(INT64))
        elif kind == "descriptor":
            index = draw(st.integers(0, 5))
            # data type, used, id, group, link, offset, size, padded size, times, extra
            off, fmt = draw(st.sampled_from([(0, "<i"), (4, "<B"), (5, "<I"), (9, "<I"),
                                             (13, "<I"), (17, "<q"), (25, "<q"), (33, "<q"),
                                             (41, "<q"), (49, "<q"), (201, "<i"),
                                             (205, "<i"), (209, "<i")]))
            pos = 4096 + 585 * index + off
            if pos + struct.calcsize(fmt) <= len(data):
                if fmt == "<q":
                    value = draw(INT64)
                elif fmt == "<B":
                    value = draw(st.integers(0, 255))
                elif fmt == "<i":
                    value = draw(st.one_of(st.integers(-(1 << 31), (1 << 31) - 1),
                                           st.integers(0x4000, 0x400F), st.integers(0, 6)))
                else:
                    value = draw(st.integers(0, (1 << 32) - 1))
                struct.pack_into(fmt, data, pos, value)
        elif kind == "bytes" and data:
            pos = draw(st.integers(0, len(data) - 1))
            chunk = draw(st.binary(min_size=1, max_size=64))
            data[pos:pos + len(chunk)] = chunk
    return bytes(data)


def _exercise(path):
    img = sif.SifImage.open(path)
    sif.format_header(img)
    sif.format_list(img)
    for d in img.descriptors:
        try:
            sif.format_info(img, d.id)
        except UsageError:
            pass
        if d.size <= 1 << 16:
            assert len(img.read_object(d.id)) == d.size
    sif.primary_squashfs(path)


@settings(max_examples=200, deadline=1000, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                 HealthCheck.function_scoped_fixture])
@given(data=mutated())
def test_mutated_sif_parses_or_raises_usage_error(data, monkeypatch):
    fd, path = tempfile.mkstemp(suffix=".sif")
    try:
        os.write(fd, data)
        os.close(fd)
        size = len(data)
        real_pread = os.pread

        def checked_pread(f, n, off):
            assert 0 <= n <= max(size, 128), f"read of {n} bytes from a {size}-byte file"
            return real_pread(f, n, off)
        monkeypatch.setattr(os, "pread", checked_pread)
        tracemalloc.start()
        try:
            try:
                _exercise(path)
            except UsageError as e:
                assert str(e).startswith(f"{path}: ") and "\n" not in str(e)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
            monkeypatch.undo()
        assert peak < MAX_PEAK, f"allocated {peak} bytes for a {size}-byte file"
    finally:
        os.unlink(path)
