"""SIF, the Singularity Image Format: reader, writer and siftool's text formats.

The container runtime imports this module on every launch, so it uses the standard
library only and does no work at import time. Opening an image reads the 128-byte global
header and the descriptor table and nothing else: the cost of `SifImage.open` does not
depend on the size of the objects in the file.

Layout (all integers little-endian, structures packed, as Go's encoding/binary writes
them in github.com/sylabs/sif/v2):

    global header, 128 bytes at offset 0
        launch script [32]  magic "SIF_MAGIC\\0" [10]  version "01\\0" [3]  arch [3]
        uuid [16]  created, modified, descriptors free, descriptors total,
        descriptors offset, descriptors size, data offset, data size (8 x int64)
    descriptor table, `descriptors total` x 585 bytes at `descriptors offset`
        data type int32, used bool, id u32, group id u32, linked id u32,
        offset, size, size with padding, created, modified, uid, gid (7 x int64),
        name [128], extra [384] (type-specific: partition, signature, ...)
    data objects

A corrupt or hostile file raises `UsageError("<path>: <what is wrong>")`; every size and
offset is checked against the file size before anything is read.
"""
import os
import struct

from hpcimage import fsutil
from hpcimage.errors import HpcimageError, UsageError
from hpcimage.image.magic import SIF_MAGIC, SQUASHFS_MAGIC

LAUNCH_SCRIPT = b"#!/usr/bin/env run-singularity\n"
MAGIC = SIF_MAGIC + b"\x00"
VERSION = b"01\x00"

HEADER_SIZE = 128
DESCRIPTOR_SIZE = 585
DEFAULT_DESCRIPTORS = 48          # what the sif library and apptainer allocate
DESCRIPTORS_OFFSET = 4096         # where the sif library puts the descriptor table
PARTITION_ALIGNMENT = 4096        # the sif library aligns partitions, nothing else
MAX_DESCRIPTORS = 1 << 16         # more is "absurd": 38 MiB of table
GROUP_MASK = 0xF0000000

# Go's zero time.Time as Unix seconds: what deterministic images store for "no time".
GO_ZERO_TIME = -62135596800

_HEADER = struct.Struct("<32s10s3s3s16s8q")
_DESCRIPTOR = struct.Struct("<i?III7q128s384s")
_PARTITION = struct.Struct("<ii3s")
_SIGNATURE = struct.Struct("<i256s")
_CRYPTO = struct.Struct("<ii")
_SBOM = struct.Struct("<i")

# Data object types.
DATA_DEFFILE = 0x4001
DATA_ENVVAR = 0x4002
DATA_LABELS = 0x4003
DATA_PARTITION = 0x4004
DATA_SIGNATURE = 0x4005
DATA_GENERIC_JSON = 0x4006
DATA_GENERIC = 0x4007
DATA_CRYPTO_MESSAGE = 0x4008
DATA_SBOM = 0x4009
DATA_OCI_ROOT_INDEX = 0x400A
DATA_OCI_BLOB = 0x400B

DATA_TYPE_NAMES = {
    DATA_DEFFILE: "Def.FILE",
    DATA_ENVVAR: "Env.Vars",
    DATA_LABELS: "JSON.Labels",
    DATA_PARTITION: "FS",
    DATA_SIGNATURE: "Signature",
    DATA_GENERIC_JSON: "JSON.Generic",
    DATA_GENERIC: "Generic/Raw",
    DATA_CRYPTO_MESSAGE: "Cryptographic Message",
    DATA_SBOM: "SBOM",
    DATA_OCI_ROOT_INDEX: "OCI.RootIndex",
    DATA_OCI_BLOB: "OCI.Blob",
}

# Partition file system types.
FS_SQUASH = 1
FS_EXT3 = 2
FS_IMMUTABLE_OBJECTS = 3
FS_RAW = 4
FS_ENCRYPTED_SQUASH = 5
FS_GOCRYPTFS_SQUASH = 6          # Apptainer 1.2+'s unprivileged encryption (docs/encryption.md)
FS_TYPE_NAMES = {
    FS_SQUASH: "Squashfs",
    FS_EXT3: "Ext3",
    FS_IMMUTABLE_OBJECTS: "Archive",
    FS_RAW: "Raw",
    FS_ENCRYPTED_SQUASH: "Encrypted squashfs",
    FS_GOCRYPTFS_SQUASH: "Gocryptfs squashfs",
}

# Partition types.
PART_SYSTEM = 1
PART_PRIMARY_SYSTEM = 2
PART_DATA = 3
PART_OVERLAY = 4
PART_TYPE_NAMES = {
    PART_SYSTEM: "System",
    PART_PRIMARY_SYSTEM: "*System",
    PART_DATA: "Data",
    PART_OVERLAY: "Overlay",
}

# Signature hash types, named as Go's crypto.Hash names them.
HASH_TYPE_NAMES = {
    1: "SHA-256",
    2: "SHA-384",
    3: "SHA-512",
    4: "BLAKE2s-256",
    5: "BLAKE2b-256",
}

FORMAT_TYPE_NAMES = {1: "OpenPGP", 2: "PEM"}
MESSAGE_TYPE_NAMES = {0x100: "Clear Signature", 0x200: "RSA-OAEP"}
SBOM_FORMAT_NAMES = {
    1: "cyclonedx-json",
    2: "cyclonedx-xml",
    3: "github-json",
    4: "spdx-json",
    5: "spdx-rdf",
    6: "spdx-tag-value",
    7: "spdx-yaml",
    8: "syft-json",
}

# Architecture codes (3 bytes, NUL-terminated) <-> Go architecture names.
ARCH_CODES = {
    b"01\x00": "386",
    b"02\x00": "amd64",
    b"03\x00": "arm",
    b"04\x00": "arm64",
    b"05\x00": "ppc64",
    b"06\x00": "ppc64le",
    b"07\x00": "mips",
    b"08\x00": "mipsle",
    b"09\x00": "mips64",
    b"10\x00": "mips64le",
    b"11\x00": "s390x",
    b"12\x00": "riscv64",
}
ARCH_UNKNOWN = b"00\x00"
_GOARCH_CODES = {v: k for k, v in ARCH_CODES.items()}
# os.uname().machine -> Go architecture name: hpcimage.image.arch.MACHINE_GOARCH.



def goarch_name(code):
    """The Go name of a 3-byte SIF architecture code, "unknown" when not one."""
    return ARCH_CODES.get(code, "unknown")


def host_goarch():
    """The Go architecture name of this machine (what `apptainer build` records)."""
    from hpcimage.image.arch import MACHINE_GOARCH
    machine = os.uname().machine
    arch = MACHINE_GOARCH.get(machine)
    if arch is None:
        raise UsageError(f"unknown machine architecture {machine!r}; pass arch=")
    return arch


def _cstr(raw):
    """A fixed-size field up to its trailing NULs (Go's bytes.TrimRight(b, "\\x00"))."""
    return raw.rstrip(b"\x00")


class SifHeader:
    """The global header, field by field as stored."""

    __slots__ = ("launch_script", "magic", "version", "arch", "id", "created_at",
                 "modified_at", "descriptors_free", "descriptors_total",
                 "descriptors_offset", "descriptors_size", "data_offset", "data_size")

    def __init__(self, raw):
        (self.launch_script, self.magic, self.version, self.arch, self.id,
         self.created_at, self.modified_at, self.descriptors_free,
         self.descriptors_total, self.descriptors_offset, self.descriptors_size,
         self.data_offset, self.data_size) = _HEADER.unpack(raw)

    @property
    def arch_name(self):
        """The primary architecture as Go names it ("amd64"), "unknown" if none."""
        return goarch_name(self.arch)

    @property
    def uuid(self):
        """The image ID as the canonical 8-4-4-4-12 lower-case string."""
        return format_uuid(self.id)

    def __repr__(self):
        return (f"SifHeader(version={self.version!r}, arch={self.arch_name}, "
                f"id={self.uuid}, descriptors={self.descriptors_total}, "
                f"data_offset={self.data_offset}, data_size={self.data_size})")


class SifDescriptor:
    """One data object descriptor, with its type-specific `extra` decoded on demand."""

    __slots__ = ("index", "data_type", "used", "id", "raw_group_id", "raw_linked_id",
                 "offset", "size", "size_with_padding", "created_at", "modified_at",
                 "uid", "gid", "raw_name", "extra")

    def __init__(self, index, raw):
        self.index = index
        (self.data_type, self.used, self.id, self.raw_group_id, self.raw_linked_id,
         self.offset, self.size, self.size_with_padding, self.created_at,
         self.modified_at, self.uid, self.gid, self.raw_name,
         self.extra) = _DESCRIPTOR.unpack(raw)

    @property
    def end(self):
        return self.offset + self.size

    @property
    def data_type_name(self):
        return DATA_TYPE_NAMES.get(self.data_type, "Unknown")

    @property
    def group_id(self):
        """The object group (0: in no group)."""
        return self.raw_group_id & ~GROUP_MASK & 0xFFFFFFFF

    @property
    def linked_id(self):
        """(id, is_group): the object or group this one is linked to; id 0: none."""
        return (self.raw_linked_id & ~GROUP_MASK & 0xFFFFFFFF,
                self.raw_linked_id & GROUP_MASK == GROUP_MASK)

    @property
    def name(self):
        """The object name (bytes, NULs trimmed)."""
        return _cstr(self.raw_name)

    # --- partitions
    def _partition(self):
        return _PARTITION.unpack_from(self.extra)

    @property
    def fstype(self):
        return self._partition()[0] if self.data_type == DATA_PARTITION else None

    @property
    def fstype_name(self):
        return FS_TYPE_NAMES.get(self.fstype, "Unknown")

    @property
    def parttype(self):
        return self._partition()[1] if self.data_type == DATA_PARTITION else None

    @property
    def parttype_name(self):
        return PART_TYPE_NAMES.get(self.parttype, "Unknown")

    @property
    def arch(self):
        """A partition's architecture code (3 bytes)."""
        return self._partition()[2] if self.data_type == DATA_PARTITION else None

    @property
    def arch_name(self):
        return goarch_name(self.arch)

    @property
    def is_primary_partition(self):
        return self.data_type == DATA_PARTITION and self.parttype == PART_PRIMARY_SYSTEM

    # --- signatures
    @property
    def hash_type(self):
        return _SIGNATURE.unpack_from(self.extra)[0] if self.data_type == DATA_SIGNATURE else None

    @property
    def hash_type_name(self):
        """Go's name of the hash ("SHA-256"), None when the code is not a known hash."""
        return HASH_TYPE_NAMES.get(self.hash_type)

    @property
    def fingerprint(self):
        """The signing entity's 20-byte fingerprint, None when absent (all zeros)."""
        if self.data_type != DATA_SIGNATURE:
            return None
        fp = _SIGNATURE.unpack_from(self.extra)[1][:20]
        return None if fp == bytes(20) else fp

    # --- cryptographic messages
    @property
    def format_type(self):
        return _CRYPTO.unpack_from(self.extra)[0] if self.data_type == DATA_CRYPTO_MESSAGE else None

    @property
    def message_type(self):
        return _CRYPTO.unpack_from(self.extra)[1] if self.data_type == DATA_CRYPTO_MESSAGE else None

    # --- SBOM and OCI objects
    @property
    def sbom_format(self):
        return _SBOM.unpack_from(self.extra)[0] if self.data_type == DATA_SBOM else None

    @property
    def oci_digest(self):
        """An OCI blob's digest ("sha256:..."), bytes up to the first NUL."""
        if self.data_type not in (DATA_OCI_BLOB, DATA_OCI_ROOT_INDEX):
            return None
        return self.extra.split(b"\x00", 1)[0]

    def __repr__(self):
        extra = ""
        if self.data_type == DATA_PARTITION:
            extra = f", fs={self.fstype_name}, part={self.parttype_name}, arch={self.arch_name}"
        return (f"SifDescriptor(id={self.id}, type={self.data_type_name}, "
                f"group={self.group_id}, offset={self.offset}, size={self.size}{extra})")


class SifImage:
    """An opened SIF file: its header and its used descriptors, in table order.

    No file descriptor stays open; `read_object`/`copy_object` reopen the file and
    check what they read against the sizes validated here.
    """

    def __init__(self, path, header, descriptors, file_size):
        self.path = path
        self.header = header
        self.descriptors = descriptors
        self.file_size = file_size

    @classmethod
    def open(cls, path):
        path = os.fspath(path)
        fd = _open_regular(path)
        try:
            return cls._load(path, fd)
        finally:
            os.close(fd)

    @classmethod
    def _load(cls, path, fd):
        size = os.fstat(fd).st_size
        raw = _pread_exact(fd, min(size, HEADER_SIZE), 0, path, "global header")
        magic = raw[32:42]
        if magic != MAGIC[:len(magic)] or size <= 32:
            raise UsageError(f"{path}: not a SIF image (bad magic)")
        if size < HEADER_SIZE:
            raise UsageError(f"{path}: truncated SIF file: {size} bytes, "
                             f"the global header alone needs {HEADER_SIZE}")
        h = SifHeader(raw)
        if h.version != VERSION:
            raise UsageError(f"{path}: unsupported SIF version {_cstr(h.version)!r} "
                             f"(this reader knows version 01)")
        total = h.descriptors_total
        if total < 0 or total > MAX_DESCRIPTORS:
            raise UsageError(f"{path}: absurd descriptor count {total}")
        if h.descriptors_free < 0 or h.descriptors_free > total:
            raise UsageError(f"{path}: absurd free descriptor count "
                             f"{h.descriptors_free} (of {total})")
        table = total * DESCRIPTOR_SIZE
        off = h.descriptors_offset
        if off < HEADER_SIZE or off > size:
            raise UsageError(f"{path}: descriptor table offset {off} is outside the file "
                             f"(size {size})")
        if h.descriptors_size < table:
            raise UsageError(f"{path}: descriptor table size {h.descriptors_size} is "
                             f"smaller than {total} descriptors need ({table})")
        if h.descriptors_size > size - off:
            raise UsageError(f"{path}: descriptor table ({h.descriptors_size} bytes at "
                             f"{off}) runs past the end of the file (size {size})")
        if h.data_offset < 0 or h.data_size < 0 or h.data_offset > size \
                or h.data_size > size - h.data_offset:
            raise UsageError(f"{path}: data section ({h.data_size} bytes at "
                             f"{h.data_offset}) runs past the end of the file (size {size})")
        raw_table = _pread_exact(fd, table, off, path, "descriptor table")
        descriptors = []
        ids = set()
        for i in range(total):
            start = i * DESCRIPTOR_SIZE
            if not raw_table[start + 4]:    # `used` is false: an empty slot
                continue
            d = SifDescriptor(i, raw_table[start:start + DESCRIPTOR_SIZE])
            if d.id in ids:
                raise UsageError(f"{path}: two descriptors have object ID {d.id}")
            ids.add(d.id)
            if d.offset < 0 or d.size < 0 or d.offset > size or d.size > size - d.offset:
                raise UsageError(f"{path}: object {d.id} ({d.size} bytes at {d.offset}) "
                                 f"lies outside the file (size {size})")
            if d.size and (d.offset < HEADER_SIZE or d.offset < off + table and d.end > off):
                raise UsageError(f"{path}: object {d.id} ({d.size} bytes at {d.offset}) "
                                 f"overlaps the SIF header or descriptor table")
            descriptors.append(d)
        spans = sorted((d for d in descriptors if d.size), key=lambda d: d.offset)
        for a, b in zip(spans, spans[1:]):
            if b.offset < a.end:
                raise UsageError(f"{path}: objects {a.id} ({a.offset}-{a.end}) and "
                                 f"{b.id} ({b.offset}-{b.end}) overlap")
        return cls(path, h, descriptors, size)

    def descriptor(self, object_id):
        """The used descriptor with this object ID; UsageError if there is none."""
        for d in self.descriptors:
            if d.id == object_id:
                return d
        raise UsageError(f"{self.path}: no object with ID {object_id}")

    def primary_partition(self):
        """The primary system partition's descriptor (`.offset`, `.size`, `.fstype`)."""
        found = [d for d in self.descriptors if d.is_primary_partition]
        if not found:
            raise UsageError(f"{self.path}: SIF image has no primary system partition")
        if len(found) > 1:
            raise UsageError(f"{self.path}: SIF image has {len(found)} primary system "
                             f"partitions (objects {', '.join(str(d.id) for d in found)})")
        return found[0]

    def read_object(self, object_id, limit=64 << 20):
        """An object's bytes (at most `limit` of them: use copy_object for partitions)."""
        d = self.descriptor(object_id)
        if d.size > limit:
            raise UsageError(f"{self.path}: object {object_id} is {d.size} bytes, "
                             f"more than {limit} to read into memory")
        chunks = []
        self.copy_object(object_id, chunks.append)
        return b"".join(chunks)

    def copy_object(self, object_id, write, chunk_size=1 << 20):
        """Stream an object's bytes to `write(bytes)`, `chunk_size` at a time."""
        d = self.descriptor(object_id)
        fd = _open_regular(self.path)
        try:
            pos, left = d.offset, d.size
            while left:
                n = min(left, chunk_size)
                data = os.pread(fd, n, pos)
                if not data:
                    raise UsageError(f"{self.path}: truncated while reading object "
                                     f"{object_id} (file shrank?)")
                write(data)
                pos += len(data)
                left -= len(data)
        finally:
            os.close(fd)
        return d.size

    def __repr__(self):
        return f"SifImage({self.path!r}, {len(self.descriptors)} objects)"


def open_sif(path):
    """`SifImage.open(path)`."""
    return SifImage.open(path)


def is_sif(path):
    """True if `path` is a regular file carrying the SIF magic (no validation)."""
    try:
        with open(path, "rb") as f:
            return f.read(42)[32:42] == MAGIC
    except OSError:
        return False


ENCRYPTED_SOURCE = ("{path}: an encrypted image (gocryptfs): it runs with its key but "
                    "cannot be converted or used as a build source")


def primary_squashfs(path, with_arch=False):
    """(offset, size) of the SquashFS primary system partition of the SIF at `path`;
    with_arch: (offset, size, arch, crypt), arch the Go name of what the partition
    (else the header) says it was built for, "unknown" when neither says; crypt:
    encryption() (an encrypted partition's offset and size are the outer SquashFS's).

    The runtime's hot path: header + descriptor table + the 4 bytes of SquashFS magic.
    UsageError if there is no primary system partition or it is not SquashFS.
    """
    img = SifImage.open(path)
    d = img.primary_partition()
    if with_arch:
        arch = d.arch_name if d.arch_name != "unknown" else img.header.arch_name
        return (*_primary_squashfs_of(img, d), arch, encryption(img, d))
    if d.fstype == FS_GOCRYPTFS_SQUASH:
        raise UsageError(ENCRYPTED_SOURCE.format(path=img.path))
    return _primary_squashfs_of(img, d)


def encryption(img, d=None):
    """How the SIF img's primary partition (or d) is encrypted: None, "passphrase"
    (gocryptfs, no key message) or "pem" (gocryptfs, with a PEM/RSA-OAEP crypto
    message linked to it)."""
    d = d or img.primary_partition()
    if d.fstype != FS_GOCRYPTFS_SQUASH:
        return None
    return "pem" if crypto_message(img, d) is not None else "passphrase"


def crypto_message(img, d):
    """The descriptor of the PEM/RSA-OAEP crypto message linked to partition d, or None."""
    for m in img.descriptors:
        if (m.data_type == DATA_CRYPTO_MESSAGE and m.linked_id == (d.id, False)
                and _CRYPTO.unpack_from(m.extra) == (2, 0x200)):
            return m
    return None


def _primary_squashfs_of(img, d):
    if d.fstype not in (FS_SQUASH, FS_GOCRYPTFS_SQUASH):
        hint = ""
        if d.fstype == FS_ENCRYPTED_SQUASH:
            hint = (" (encrypted SIF images of the dm-crypt kind, built by root, are not "
                    "supported; gocryptfs ones are)")
        raise UsageError(f"{img.path}: primary partition (object {d.id}) is "
                         f"{d.fstype_name}, not SquashFS{hint}")
    fd = _open_regular(img.path)
    try:
        magic = os.pread(fd, 4, d.offset)
    finally:
        os.close(fd)
    if magic != SQUASHFS_MAGIC:
        raise UsageError(f"{img.path}: primary partition (object {d.id}, {d.size} bytes at "
                         f"{d.offset}) says SquashFS but has no SquashFS superblock")
    return d.offset, d.size


def format_uuid(raw):
    h = raw.hex()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def _open_regular(path):
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise UsageError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise UsageError(f"{path}: is a directory, not a SIF image") from None
    except OSError as e:
        raise UsageError(f"{path}: cannot open: {e.strerror}") from None
    import stat
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        if stat.S_ISDIR(mode):
            raise UsageError(f"{path}: is a directory, not a SIF image")
        raise UsageError(f"{path}: not a regular file")
    return fd


def _open_for_append(path):
    """The SIF at path, known writable (require_writable), opened for reading (the
    copy that replaces it is written beside it)."""
    require_writable(path)
    return _open_regular(path)


def require_writable(path):
    """Refuse (exit 1) to change the SIF at PATH unless the user may open it for
    writing, as Apptainer, which opens it read-write, does: the atomic copy and rename
    of append_object/append_partition would need only the directory's permission."""
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_CLOEXEC | os.O_NONBLOCK))
    except OSError as e:
        raise HpcimageError(f"{path}: cannot open for writing: {e.strerror}") from None


def _pread_exact(fd, n, offset, path, what):
    data = b""
    while len(data) < n:
        try:
            chunk = os.pread(fd, n - len(data), offset + len(data))
        except OSError as e:
            raise UsageError(f"{path}: cannot read {what}: {e.strerror}") from None
        if not chunk:
            raise UsageError(f"{path}: truncated {what} (file shrank while reading?)")
        data += chunk
    return data


# ---------------------------------------------------------------- siftool text formats
#
# `siftool header|list|info` output, byte for byte. siftool formats with Go's fmt and
# text/tabwriter; the helpers below reproduce the parts it uses: Time.String() for
# Unix seconds, readableSize, and a tabwriter (minwidth 0, padchar ' ', no flags).

_ABS_OFFSET = 9223372028715321600   # Go: unixToInternal + internalToAbsolute
_ABS_ZERO_YEAR = -292277022399      # Go: absoluteZeroYear (1 mod 400)
_DAYS_BEFORE = (0, 31, 59, 90, 120, 151, 181, 212, 243, 273, 304, 334, 365)


def go_time(sec):
    """Go's `time.Unix(sec, 0).UTC().String()`, for any int64 `sec`."""
    # Go computes an unsigned "absolute" time from the year -292277022399; int64
    # overflow wraps the same way as this modulo.
    abs_sec = (sec + _ABS_OFFSET) % (1 << 64)
    days, secs = divmod(abs_sec, 86400)
    n, days = divmod(days, 146097)
    year = 400 * n
    n = days // 36524
    n -= n >> 2
    year += 100 * n
    days -= 36524 * n
    n, days = divmod(days, 1461)
    year += 4 * n
    n = days // 365
    n -= n >> 2
    year += n
    days -= 365 * n
    year += _ABS_ZERO_YEAR
    leap = year % 4 == 0 and (year % 100 != 0 or year % 400 == 0)
    yday = days
    month = 1
    while month < 12:
        end = _DAYS_BEFORE[month] + (1 if leap and month >= 2 else 0)
        if yday < end:
            break
        month += 1
    day = yday - _DAYS_BEFORE[month - 1] - (1 if leap and month > 2 else 0) + 1
    ys = f"-{-year:04d}" if year < 0 else f"{year:04d}"
    hh, rest = divmod(secs, 3600)
    mm, ss = divmod(rest, 60)
    return f"{ys}-{month:02d}-{day:02d} {hh:02d}:{mm:02d}:{ss:02d} +0000 UTC"


def _go_trunc_div(a, b):
    q = abs(a) // b
    return -q if a < 0 else q


def readable_size(size):
    """siftool's readableSize: "27 KiB", "9 KiB", "0 B"."""
    if -1024 < size < 1024:
        return f"{size} B"
    units = "KMGTPE"
    div, exp = 1024, 0
    n = _go_trunc_div(size, 1024)
    while n <= -1024 or 1024 <= n:
        div *= 1024
        exp += 1
        n = _go_trunc_div(n, 1024)
    x = float(size) / float(div)
    r = float(int(abs(x)))                # Go's math.Round: half away from zero
    if abs(x) - r >= 0.5:
        r += 1.0
    r = -r if x < 0 else r
    return "%.0f %siB" % (r, units[exp])


def _rune_count(b):
    # utf8.RuneCount: each invalid byte counts as one rune, as surrogateescape does.
    return len(b.decode("utf-8", "surrogateescape"))


def go_tabwrite(data, padding):
    """Go's text/tabwriter.NewWriter(w, 0, 0, padding, ' ', 0) fed `data`, flushed."""
    lines = [[]]                # cells: [text bytes, width]
    cell = bytearray()
    width = 0
    seg = 0                     # start of the text not yet counted into width
    i, n = 0, len(data)
    escaped = False
    while i < n:
        ch = data[i]
        if escaped:
            if ch == 0xFF:      # end of escape: keep both 0xff, count neither
                cell += data[seg:i + 1]
                width += _rune_count(data[seg:i + 1]) - 2
                seg = i + 1
                escaped = False
        elif ch in (9, 11, 10, 12):           # \t \v \n \f end a cell
            cell += data[seg:i]
            width += _rune_count(data[seg:i])
            lines[-1].append((bytes(cell), width))
            cell, width, seg = bytearray(), 0, i + 1
            if ch in (10, 12):
                lines.append([])
        elif ch == 0xFF:
            cell += data[seg:i]
            width += _rune_count(data[seg:i])
            seg = i
            escaped = True
        i += 1
    cell += data[seg:]
    if escaped:
        width += _rune_count(data[seg:]) - 2
    else:
        width += _rune_count(data[seg:])
    if cell:
        lines[-1].append((bytes(cell), width))
    out = bytearray()
    widths = []

    def write_lines(line0, line1):
        for k in range(line0, line1):
            line = lines[k]
            for j, (text, w) in enumerate(line):
                out.extend(text)
                if j < len(widths):
                    out.extend(b" " * (widths[j] - w))
            if k + 1 < len(lines):
                out.extend(b"\n")

    def fmt(line0, line1):
        column = len(widths)
        this = line0
        while this < line1:
            if column >= len(lines[this]) - 1:
                this += 1
                continue
            write_lines(line0, this)
            line0 = this
            w = 0
            while this < line1 and column < len(lines[this]) - 1:
                w = max(w, lines[this][column][1] + padding)
                this += 1
            widths.append(w)
            fmt(line0, this)
            widths.pop()
            line0 = this
        write_lines(line0, line1)

    fmt(0, len(lines))
    return bytes(out)


def _b(v):
    return v if isinstance(v, bytes) else str(v).encode()


def format_header(img):
    """`siftool header IMAGE`."""
    h = img.header
    rows = []
    launch = _cstr(h.launch_script)
    if launch:
        if launch.endswith(b"\n"):
            launch = launch[:-1]
        rows.append((b"Launch Script:", launch))
    rows.append((b"Version:", _cstr(h.version)))
    if h.arch_name != "unknown":
        rows.append((b"Primary Architecture:", h.arch_name))
    if h.id != bytes(16):
        rows.append((b"ID:", h.uuid))
    if h.created_at != GO_ZERO_TIME:
        rows.append((b"Created At:", go_time(h.created_at)))
    if h.modified_at != GO_ZERO_TIME:
        rows.append((b"Modified At:", go_time(h.modified_at)))
    rows += [
        (b"Descriptors Free:", h.descriptors_free),
        (b"Descriptors Total:", h.descriptors_total),
        (b"Descriptors Offset:", h.descriptors_offset),
        (b"Descriptors Size:", readable_size(h.descriptors_size)),
        (b"Data Offset:", h.data_offset),
        (b"Data Size:", readable_size(h.data_size)),
    ]
    return go_tabwrite(b"".join(k + b"\t" + _b(v) + b"\n" for k, v in rows), 1)


_RULE = b"-" * 78 + b"\n"


def _int64(v):
    v &= (1 << 64) - 1
    return v - (1 << 64) if v >= 1 << 63 else v


def format_list(img):
    """`siftool list IMAGE`."""
    out = [_RULE, b"%-4s %-8s %-8s %-26s %s\n" % (b"ID", b"|GROUP", b"|LINK",
                                                  b"|SIF POSITION (start-end)", b"|TYPE"),
           _RULE]
    for d in img.descriptors:
        out.append(b"%-4d " % d.id)
        g = d.group_id
        out.append(b"|%-7s " % b"NONE" if g == 0 else b"|%-7d " % g)
        lid, is_group = d.linked_id
        if lid == 0:
            out.append(b"|%-7s " % b"NONE")
        elif is_group:
            out.append(b"|%-3d (G) " % lid)
        else:
            out.append(b"|%-7d " % lid)
        out.append(b"%-26s " % (b"|%d-%d " % (d.offset, _int64(d.offset + d.size))))
        name = d.data_type_name.encode()
        if d.data_type == DATA_PARTITION:
            out.append(b"|%s (%s/%s/%s)\n" % (name, d.fstype_name.encode(),
                                              d.parttype_name.encode(), d.arch_name.encode()))
        elif d.data_type == DATA_SIGNATURE:
            ht = d.hash_type_name
            if ht is not None:          # siftool prints nothing, not even "\n", otherwise
                out.append(b"|%s (%s)\n" % (name, ht.encode()))
        elif d.data_type == DATA_CRYPTO_MESSAGE:
            out.append(b"|%s (%s/%s)\n" % (
                name, FORMAT_TYPE_NAMES.get(d.format_type, "Unknown").encode(),
                MESSAGE_TYPE_NAMES.get(d.message_type, "Unknown").encode()))
        elif d.data_type == DATA_SBOM:
            out.append(b"|%s (%s)\n" % (
                name, SBOM_FORMAT_NAMES.get(d.sbom_format, "unknown").encode()))
        else:
            out.append(b"|%s\n" % name)
    return b"".join(out)


def format_info(img, object_id):
    """`siftool info ID IMAGE`."""
    d = img.descriptor(object_id)
    rows = [(b"Data Type:", d.data_type_name), (b"ID:", d.id)]
    g = d.group_id
    rows.append((b"Group ID:", b"NONE" if g == 0 else g))
    lid, is_group = d.linked_id
    rows.append((b"Linked ID:", b"NONE" if lid == 0 else b"%d (G)" % lid if is_group else lid))
    rows += [(b"Offset:", d.offset), (b"Size:", d.size)]
    if d.created_at != GO_ZERO_TIME:
        rows.append((b"Created At:", go_time(d.created_at)))
    if d.modified_at != GO_ZERO_TIME:
        rows.append((b"Modified At:", go_time(d.modified_at)))
    if d.name:
        rows.append((b"Name:", d.name))
    t = d.data_type
    if t == DATA_PARTITION:
        rows += [(b"Filesystem Type:", d.fstype_name), (b"Partition Type:", d.parttype_name),
                 (b"Architecture:", d.arch_name)]
    elif t == DATA_SIGNATURE:
        if d.hash_type_name is None:
            raise UsageError(f"{img.path}: object {d.id}: unsupported signature hash "
                             f"type {d.hash_type}")
        rows.append((b"Hash Type:", d.hash_type_name))
        if d.fingerprint:
            rows.append((b"Entity:", d.fingerprint.hex().upper()))
    elif t == DATA_CRYPTO_MESSAGE:
        rows += [(b"Format Type:", FORMAT_TYPE_NAMES.get(d.format_type, "Unknown")),
                 (b"Message Type:", MESSAGE_TYPE_NAMES.get(d.message_type, "Unknown"))]
    elif t == DATA_SBOM:
        rows.append((b"Format:", SBOM_FORMAT_NAMES.get(d.sbom_format, "unknown")))
    elif t in (DATA_OCI_BLOB, DATA_OCI_ROOT_INDEX):
        rows.append((b"Digest:", d.oci_digest))
    return go_tabwrite(b"".join(b"\t" + k + b"\t" + _b(v) + b"\n" for k, v in rows), 2)


# ---------------------------------------------------------------------------- writer

def write_sif(out_path, squashfs_path, deffile=None, labels=None, arch=None,
              launch_script=LAUNCH_SCRIPT, fstype=FS_SQUASH, crypto_message=None):
    """Write a SIF around a SquashFS image, as `apptainer build` lays one out.

    Header, a table of 48 descriptors at 4096, then the objects from offset 32176:
    the definition file (`deffile`, bytes or str; DATA_DEFFILE), the labels (`labels`,
    a dict or JSON bytes/str; DATA_LABELS), then the SquashFS as the primary system
    partition, aligned to 4096, in object group 1. Fresh random UUID and the current
    time. `arch` is a Go architecture name (default: this machine's). `fstype`:
    FS_GOCRYPTFS_SQUASH for an encrypted image (imagebuild.crypt), whose
    `crypto_message` (bytes: a PEM MESSAGE) follows as a crypto message object
    (PEM, RSA-OAEP) linked to the partition, as Apptainer writes it.

    Written under a temporary name beside `out_path` and renamed into place; the
    SquashFS is streamed (holes stay holes), never read into memory. Returns the
    SifImage read back from the result.
    """
    import time

    out_path = os.fspath(out_path)
    squashfs_path = os.fspath(squashfs_path)
    arch = arch or host_goarch()
    code = _GOARCH_CODES.get(arch)
    if code is None:
        raise UsageError(f"unknown architecture {arch!r} "
                         f"(one of: {', '.join(sorted(_GOARCH_CODES))})")
    if len(launch_script) >= 32:
        raise UsageError("SIF launch script must be shorter than 32 bytes")
    objects = []                # (data type, bytes or fd, extra, alignment)
    if deffile is not None:
        objects.append((DATA_DEFFILE, _as_bytes(deffile), b"", 0))
    if labels is not None:
        if isinstance(labels, dict):
            import json
            labels = json.dumps(labels, indent=1, sort_keys=True) + "\n"
        objects.append((DATA_LABELS, _as_bytes(labels), b"", 0))
    src = _open_regular(squashfs_path)
    try:
        if os.pread(src, 4, 0) != SQUASHFS_MAGIC:
            raise UsageError(f"{squashfs_path}: not a SquashFS image (bad magic)")
        objects.append((DATA_PARTITION, src,
                        _PARTITION.pack(fstype, PART_PRIMARY_SYSTEM, code),
                        PARTITION_ALIGNMENT))
        if crypto_message is not None:
            objects.append((DATA_CRYPTO_MESSAGE, _as_bytes(crypto_message),
                            _CRYPTO.pack(2, 0x200), 0, len(objects)))
        now = int(time.time())
        try:                    # fsutil: temporary name, fsync, rename, fsync the directory
            with fsutil.AtomicFile(out_path, 0o755, _temp_beside(out_path)) as f:
                _write_objects(f.fileno(), objects, code, now, launch_script)
        except OSError as e:
            raise HpcimageError(f"{out_path}: cannot write SIF: {e.strerror or e}") from None
    finally:
        os.close(src)
    return SifImage.open(out_path)


def _as_bytes(v):
    return v.encode() if isinstance(v, str) else bytes(v)


def _temp_beside(path):
    d, base = os.path.split(os.path.abspath(path))
    return os.path.join(d, f".{base}.tmp-{os.getpid()}-{os.urandom(4).hex()}")


def _write_objects(fd, objects, arch_code, now, launch_script):
    table_size = DEFAULT_DESCRIPTORS * DESCRIPTOR_SIZE
    data_offset = DESCRIPTORS_OFFSET + table_size
    pos = data_offset
    table = bytearray(table_size)
    for i, (dtype, payload, extra, align, *link) in enumerate(objects):
        start = pos
        if align and start % align:
            start += align - start % align
        if isinstance(payload, bytes):
            n = len(payload)
            if n:
                os.pwrite(fd, payload, start)
        else:
            n = _copy_sparse(payload, fd, start)
        _DESCRIPTOR.pack_into(
            table, i * DESCRIPTOR_SIZE, dtype, True, i + 1, GROUP_MASK | 1,
            link[0] if link else 0,
            start, n, start - pos + n, now, now, 0, 0, b"", extra)
        pos = start + n
    os.ftruncate(fd, pos)
    uid = bytearray(os.urandom(16))
    uid[6] = (uid[6] & 0x0F) | 0x40       # RFC 4122 version 4
    uid[8] = (uid[8] & 0x3F) | 0x80
    header = _HEADER.pack(
        launch_script, MAGIC, VERSION, arch_code, bytes(uid), now, now,
        DEFAULT_DESCRIPTORS - len(objects), DEFAULT_DESCRIPTORS, DESCRIPTORS_OFFSET,
        table_size, data_offset, pos - data_offset)
    os.pwrite(fd, header, 0)
    os.pwrite(fd, bytes(table), DESCRIPTORS_OFFSET)


def _copy_sparse(src, dst, dst_offset):
    """Copy all of file `src` into `dst` at `dst_offset`, skipping holes; bytes copied."""
    size = os.fstat(src).st_size
    pos = 0
    while pos < size:
        try:
            data = os.lseek(src, pos, os.SEEK_DATA)
        except OSError:         # ENXIO: only a hole is left
            break
        try:
            hole = os.lseek(src, data, os.SEEK_HOLE)
        except OSError:
            hole = size
        _copy_range(src, dst, data, dst_offset + data, min(hole, size) - data)
        pos = hole
    return size


def _copy_range(src, dst, src_off, dst_off, count):
    fast = hasattr(os, "copy_file_range")
    while count > 0:
        n = 0
        if fast:
            try:
                n = os.copy_file_range(src, dst, min(count, 1 << 30), src_off, dst_off)
            except OSError:     # EXDEV, ENOSYS, EINVAL...: plain reads and writes
                fast = False
        if n <= 0:
            data = os.pread(src, min(count, 1 << 20), src_off)
            if not data:
                raise UsageError("SquashFS image shrank while it was being copied")
            n = os.pwrite(dst, data, dst_off)
        src_off += n
        dst_off += n
        count -= n


# ------------------------------------------------------------ adding one partition

def signed(img):
    """The signature objects of SifImage img (DATA_SIGNATURE descriptors)."""
    return [d for d in img.descriptors if d.data_type == DATA_SIGNATURE]


ENCRYPTED_FSTYPES = (FS_ENCRYPTED_SQUASH, FS_GOCRYPTFS_SQUASH)


def encrypted_partition(d):
    """True if descriptor d is an encrypted partition: the dm-crypt kind (Encrypted
    squashfs) or the gocryptfs kind (Gocryptfs squashfs, passphrase or PEM)."""
    return d.data_type == DATA_PARTITION and d.fstype in ENCRYPTED_FSTYPES


def encrypted(img):
    """The encrypted partitions of img (both kinds: encrypted_partition) and its
    crypto messages; empty for an image that is not encrypted. The one answer to
    "is this SIF encrypted" (overlay create, data binds, build sources)."""
    return [d for d in img.descriptors
            if encrypted_partition(d) or d.data_type == DATA_CRYPTO_MESSAGE]


def refuse_encrypted_source(path):
    """UsageError (exit 2) if path is an encrypted SIF: it cannot be a build source."""
    if is_sif(path) and encrypted(SifImage.open(path)):
        raise UsageError(ENCRYPTED_SOURCE.format(path=path))


def append_partition(path, part_path, fstype, parttype, arch=None):
    """Add the file part_path to the SIF at path as one more partition (fstype,
    parttype; arch: a Go name, default the primary partition's, else this machine's),
    aligned to 4096 at the end of the data, in object group 1, in the first free
    descriptor, as the sif library's AddObject does. Atomic: the SIF is copied (holes
    kept) to a temporary name beside it, changed there and renamed into place; the
    copy keeps the original's mode. Returns the new object's descriptor."""
    import time
    path = os.fspath(path)
    img = SifImage.open(path)
    h = img.header
    if h.descriptors_free <= 0:
        raise UsageError(f"{path}: no free descriptor in the SIF's table "
                         f"({h.descriptors_total} used)")
    if arch is None:
        p = [d for d in img.descriptors if d.is_primary_partition]
        arch = goarch_name(p[0].arch) if p else "unknown"
        if arch == "unknown":
            arch = host_goarch()
    code = _GOARCH_CODES.get(arch)
    if code is None:
        raise UsageError(f"unknown architecture {arch!r}")
    fd = _open_for_append(path)
    try:
        used = {d.index for d in img.descriptors}
        slot = next(i for i in range(h.descriptors_total) if i not in used)
        new_id = max((d.id for d in img.descriptors), default=0) + 1
        mode = os.fstat(fd).st_mode & 0o7777
        src = _open_regular(os.fspath(part_path))
        try:
            with fsutil.AtomicFile(path, mode, _temp_beside(path)) as f:
                out = f.fileno()
                _copy_sparse(fd, out, 0)
                end = h.data_offset + h.data_size
                start = end + (-end % PARTITION_ALIGNMENT)
                n = _copy_sparse(src, out, start)
                os.ftruncate(out, start + n)
                now = int(time.time())
                raw = _DESCRIPTOR.pack(DATA_PARTITION, True, new_id, GROUP_MASK | 1, 0,
                                       start, n, start - end + n, now, now, 0, 0, b"",
                                       _PARTITION.pack(fstype, parttype, code))
                os.pwrite(out, raw, h.descriptors_offset + slot * DESCRIPTOR_SIZE)
                header = _HEADER.pack(h.launch_script, h.magic, h.version, h.arch, h.id,
                                      h.created_at, now, h.descriptors_free - 1,
                                      h.descriptors_total, h.descriptors_offset,
                                      h.descriptors_size, h.data_offset,
                                      start + n - h.data_offset)
                os.pwrite(out, header, 0)
        except OSError as e:
            raise HpcimageError(f"{path}: cannot add the partition: "
                                f"{e.strerror or e}") from None
        finally:
            os.close(src)
    finally:
        os.close(fd)
    return SifImage.open(path).descriptor(new_id)


def signature_extra(hash_code, fingerprint=b""):
    """A signature descriptor's extra field: hash type and the signer's fingerprint."""
    return _SIGNATURE.pack(hash_code, fingerprint.ljust(20, b"\x00")[:256])


def has_signatures(path):
    """True if the SIF at PATH carries a signature object (header and table only)."""
    return any(d.data_type == DATA_SIGNATURE for d in SifImage.open(path).descriptors)


def append_object(path, data_type, data, extra=b"", link=0, link_group=False, group=0):
    """Append one data object (bytes DATA) to the SIF at PATH, as the sif library's
    AddObject does: the first free descriptor, the next object ID, the data at the end
    of the file, the header's free count, data size and modification time updated.

    Atomic: the image is copied to a temporary name beside it (copy_file_range: a
    reflink or an in-kernel copy), changed there, fsync'ed and renamed into place
    (fsutil.AtomicFile); the original is untouched on any error. Returns the new ID."""
    import time

    path = os.fspath(path)
    img = SifImage.open(path)
    h = img.header
    if h.descriptors_free <= 0:
        raise UsageError(f"{path}: no free descriptor left to add an object "
                         f"(all {h.descriptors_total} used)")
    fd = _open_for_append(path)
    try:
        raw = _pread_exact(fd, h.descriptors_total * DESCRIPTOR_SIZE, h.descriptors_offset,
                           path, "descriptor table")
        slot = next(i for i in range(h.descriptors_total) if not raw[i * DESCRIPTOR_SIZE + 4])
        new_id = max((d.id for d in img.descriptors), default=0) + 1
        now = int(time.time())
        size = img.file_size
        mode = os.fstat(fd).st_mode & 0o7777
        a = fsutil.AtomicFile(path, mode, _temp_beside(path))
        try:
            out = a.open()
            _copy_range(fd, out.fileno(), 0, 0, size)
            os.pwrite(out.fileno(), data, size)
            desc = _DESCRIPTOR.pack(
                data_type, True, new_id, (GROUP_MASK | group) & 0xFFFFFFFF,
                (link | (GROUP_MASK if link_group else 0)) & 0xFFFFFFFF,
                size, len(data), len(data), now, now, 0, 0, b"", extra)
            os.pwrite(out.fileno(), desc, h.descriptors_offset + slot * DESCRIPTOR_SIZE)
            header = _HEADER.pack(
                h.launch_script, h.magic, h.version, h.arch, h.id, h.created_at, now,
                h.descriptors_free - 1, h.descriptors_total, h.descriptors_offset,
                h.descriptors_size, h.data_offset, size + len(data) - h.data_offset)
            os.pwrite(out.fileno(), header, 0)
            a.commit()
        except OSError as e:
            raise HpcimageError(f"{path}: cannot add an object: {e.strerror or e}") from None
        finally:
            a.discard()
    finally:
        os.close(fd)
    return new_id
