"""Reading glibc's /etc/ld.so.cache directly (never running ldconfig).

Two formats exist (glibc's sysdeps/generic/dl-cache.h):

new  "glibc-ld.so.cache" "1.1", written alone by glibc >= 2.32:
         magic[17] version[3] u32 nlibs, u32 len_strings, u8 flags (endianness:
         2 little, 3 big, 0 unknown, 1 invalid), u8 pad[3], u32 extension_offset,
         u32 unused[3]  (48 bytes), then nlibs entries of 24 bytes:
         i32 flags, u32 key, u32 value, u32 osversion, u64 hwcap;
         key (soname) and value (path) are offsets from the start of this header.
old  "ld.so-1.7.0": magic[11] pad[1] u32 nlibs, then nlibs entries of 12 bytes
         (i32 flags, u32 key, u32 value), offsets counted from the end of the entries.
         Older glibc ("compat") writes the new cache right after the old entries,
         aligned to 8 bytes; we read the new one when it is there.

Entry flags: the low byte is the type (3: ELF libc6, 1: ELF), the high byte the ABI
(0x0300 x86-64, 0x0a00 aarch64, 0x0500 ppc64, 0x0400 s390x, 0x1000 riscv64 double
float, 0x0800 x32, 0x0900 arm hard float; 0 for i386 and other 32-bit). hwcap has bit
62 set for a glibc-hwcaps subdirectory entry (e.g. x86-64-v3), other bits for legacy
hwcap dirs; ld.so prefers those on matching CPUs, we prefer the baseline (hwcap 0).

Everything is bounds-checked: garbage gives ValueError (parse) or an empty cache
(LdCache), never a hang or an IndexError.
"""
import os
import struct

NEW_MAGIC = b"glibc-ld.so.cache1.1"
OLD_MAGIC = b"ld.so-1.7.0"

FLAG_TYPE_MASK = 0x00FF
FLAG_REQUIRED_MASK = 0xFF00
FLAG_ELF = 0x0001
FLAG_ELF_LIBC6 = 0x0003
FLAG_SPARC_LIB64 = 0x0100
FLAG_X8664_LIB64 = 0x0300
FLAG_S390_LIB64 = 0x0400
FLAG_POWERPC_LIB64 = 0x0500
FLAG_MIPS64_LIBN64 = 0x0700
FLAG_X8664_LIBX32 = 0x0800
FLAG_ARM_LIBHF = 0x0900
FLAG_AARCH64_LIB64 = 0x0A00
FLAG_MIPS64_LIBN64_NAN2008 = 0x0E00
FLAG_RISCV_FLOAT_ABI_DOUBLE = 0x1000
FLAG_LARCH_FLOAT_ABI_DOUBLE = 0x1200

# ABI bytes that mean "a 64-bit library".
LIB64 = (FLAG_SPARC_LIB64, 0x0200, FLAG_X8664_LIB64, FLAG_S390_LIB64, FLAG_POWERPC_LIB64,
         FLAG_MIPS64_LIBN64, FLAG_AARCH64_LIB64, FLAG_MIPS64_LIBN64_NAN2008,
         FLAG_RISCV_FLOAT_ABI_DOUBLE, 0x0F00, FLAG_LARCH_FLOAT_ABI_DOUBLE, 0x1100)

# uname machine -> (flags of its 64-bit libc6 libraries, flags of its 32-bit ones)
ARCH_FLAGS = {
    "x86_64": (FLAG_X8664_LIB64 | FLAG_ELF_LIBC6, FLAG_ELF_LIBC6),
    "aarch64": (FLAG_AARCH64_LIB64 | FLAG_ELF_LIBC6, FLAG_ARM_LIBHF | FLAG_ELF_LIBC6),
    "ppc64le": (FLAG_POWERPC_LIB64 | FLAG_ELF_LIBC6, FLAG_ELF_LIBC6),
    "ppc64": (FLAG_POWERPC_LIB64 | FLAG_ELF_LIBC6, FLAG_ELF_LIBC6),
    "s390x": (FLAG_S390_LIB64 | FLAG_ELF_LIBC6, FLAG_ELF_LIBC6),
    "riscv64": (FLAG_RISCV_FLOAT_ABI_DOUBLE | FLAG_ELF_LIBC6, None),
    "loongarch64": (FLAG_LARCH_FLOAT_ABI_DOUBLE | FLAG_ELF_LIBC6, None),
}

HWCAP_EXTENSION = 1 << 62
MAX_ENTRIES = 1 << 20          # a real cache holds a few thousand
MAX_STRING = 4096


def is_64(flags):
    return (flags & FLAG_REQUIRED_MASK) in LIB64


def _cstr(data, off, base, limit):
    """NUL-terminated string at base+off, inside data[:limit]."""
    start = base + off
    if off < 0 or start >= limit:
        raise ValueError(f"string offset {off} outside the cache")
    end = data.find(b"\0", start, min(limit, start + MAX_STRING))
    if end < 0:
        raise ValueError(f"unterminated string at {start}")
    return os.fsdecode(data[start:end])


def _parse_new(data, base):
    if len(data) < base + 48:
        raise ValueError("truncated cache header")
    flags = data[base + 28]
    endian = flags & 3
    if endian == 1:
        raise ValueError("cache marked invalid")
    bo = ">" if endian == 3 else "<"
    if endian == 0:           # written by an old ldconfig: assume this machine's order
        bo = "<" if struct.pack("=H", 1) == b"\x01\x00" else ">"
    nlibs, _len_strings = struct.unpack_from(bo + "II", data, base + 20)
    first = base + 48
    if nlibs > MAX_ENTRIES or first + nlibs * 24 > len(data):
        raise ValueError(f"cache claims {nlibs} entries, the file is too short")
    out = []
    for fl, key, value, _osv, hwcap in struct.iter_unpack(
            bo + "iIIIQ", data[first:first + nlibs * 24]):
        out.append((_cstr(data, key, base, len(data)), fl,
                    _cstr(data, value, base, len(data)), hwcap))
    return out


def _parse_old(data):
    if len(data) < 16:
        raise ValueError("truncated cache header")
    bo = "<" if struct.pack("=H", 1) == b"\x01\x00" else ">"
    nlibs, = struct.unpack_from(bo + "I", data, 12)
    if nlibs > MAX_ENTRIES or 16 + nlibs * 12 > len(data):
        raise ValueError(f"cache claims {nlibs} entries, the file is too short")
    strings = 16 + nlibs * 12
    # compat format: the new cache follows, aligned to 8 bytes.
    new = (strings + 7) & ~7
    if data[new:new + len(NEW_MAGIC)] == NEW_MAGIC:
        return _parse_new(data, new)
    out = []
    for fl, key, value in struct.iter_unpack(bo + "iII", data[16:strings]):
        out.append((_cstr(data, key, strings, len(data)), fl,
                    _cstr(data, value, strings, len(data)), 0))
    return out


def parse_full(data):
    """[(soname, flags, path, hwcap)] in file order; ValueError when data is no cache."""
    data = bytes(data)
    if data.startswith(NEW_MAGIC):
        return _parse_new(data, 0)
    if data.startswith(OLD_MAGIC):
        return _parse_old(data)
    raise ValueError("not an ld.so.cache (bad magic)")


def parse(data):
    """[(soname, flags, path)] of the cache in data (bytes), in file order.

    Raises ValueError on anything that is not a well-formed cache."""
    return [e[:3] for e in parse_full(data)]


def host_flags(machine=None):
    """(flags64, flags32) of this machine's libc6 libraries (None where unknown)."""
    return ARCH_FLAGS.get(machine or os.uname().machine, (None, None))


class LdCache:
    """The host root's /etc/ld.so.cache, read once, lazily.

    find(soname) -> the real path (below the host root, symlinks resolved inside it)
    of the library ld.so would load for soname, 64-bit (or 32-bit) for this machine."""

    PATH = "/etc/ld.so.cache"

    def __init__(self, host, machine=None):
        self.host = host
        self.machine = machine or os.uname().machine
        self.error = None          # why the cache is empty, when it is
        self._entries = None

    def _load(self):
        if self._entries is None:
            try:
                self._entries = parse_full(self.host.read_bytes(self.PATH))
            except OSError as e:
                self.error = f"{self.PATH}: {e.strerror or e}"
                self._entries = []
            except ValueError as e:
                self.error = f"{self.PATH}: {e}"
                self._entries = []
        return self._entries

    def entries(self):
        """[(soname, flags, path)] as in the cache (host paths, not below the root)."""
        return [e[:3] for e in self._load()]

    def wanted(self, flags, want64=True):
        f64, f32 = host_flags(self.machine)
        want = f64 if want64 else f32
        if want is not None:
            return flags == want
        # unknown machine: any libc6/ELF library of the right width
        return (flags & FLAG_TYPE_MASK) in (FLAG_ELF, FLAG_ELF_LIBC6) and is_64(flags) == want64

    def select(self, match, want64=True):
        """{soname: host path} of the entries whose soname satisfies match(soname),
        for the wanted width; the baseline (hwcap 0) entry wins over hwcaps ones."""
        best = {}
        for name, flags, path, hwcap in self._load():
            if not self.wanted(flags, want64) or not match(name):
                continue
            if name not in best or (best[name][1] != 0 and hwcap == 0):
                best[name] = (path, hwcap)
        return {k: v[0] for k, v in best.items()}

    def lookup(self, soname, want64=True):
        """The host path recorded for soname (not below the root), or None."""
        return self.select(lambda n: n == soname, want64).get(soname)

    def find(self, soname, want64=True):
        """Real path below the host root of the library for soname, or None."""
        p = self.lookup(soname, want64)
        if p is None:
            return None
        try:
            real = self.host.realpath(p)
        except (OSError, ValueError):
            return None
        return real if os.path.isfile(real) else None
