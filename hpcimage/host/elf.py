"""Just enough ELF: the class, machine and dynamic section of a shared library.

`info(path_or_bytes)` reads the ELF header, the program headers and the PT_DYNAMIC
segment (DT_SONAME, DT_NEEDED, DT_RPATH, DT_RUNPATH through DT_STRTAB), 32 or 64 bit,
little or big endian, with struct alone and only the bytes it needs (a 60 MB driver
library costs a few small reads). Anything malformed raises ValueError; nothing loops
unbounded. `header()` reads only the first 20 bytes.
"""
import os
import struct


class ElfInfo(tuple):
    """(elfclass, machine, soname, needed, rpath, runpath), also as attributes:
    elfclass 32|64; machine: e_machine (62 x86-64, 183 aarch64, 3 i386, 21 ppc64,
    22 s390, 243 riscv); soname: str|None; needed: [str]; rpath, runpath: str|None.
    (A namedtuple without importing collections: this is the hot path.)"""

    __slots__ = ()
    _fields = ("elfclass", "machine", "soname", "needed", "rpath", "runpath")

    def __new__(cls, elfclass, machine, soname, needed, rpath, runpath):
        return tuple.__new__(cls, (elfclass, machine, soname, needed, rpath, runpath))

    elfclass = property(lambda self: self[0])
    machine = property(lambda self: self[1])
    soname = property(lambda self: self[2])
    needed = property(lambda self: self[3])
    rpath = property(lambda self: self[4])
    runpath = property(lambda self: self[5])

    def __repr__(self):
        return "ElfInfo(" + ", ".join(f"{k}={v!r}" for k, v in zip(self._fields, self)) + ")"

EM_386, EM_PPC64, EM_S390, EM_X86_64, EM_AARCH64, EM_RISCV = 3, 21, 22, 62, 183, 243
# uname machine -> e_machine
MACHINES = {"x86_64": EM_X86_64, "i686": EM_386, "i386": EM_386, "aarch64": EM_AARCH64,
            "ppc64le": EM_PPC64, "ppc64": EM_PPC64, "s390x": EM_S390, "riscv64": EM_RISCV,
            "loongarch64": 258}

PT_LOAD, PT_DYNAMIC = 1, 2
DT_NULL, DT_NEEDED, DT_STRTAB, DT_STRSZ, DT_SONAME, DT_RPATH, DT_RUNPATH = 0, 1, 5, 10, 14, 15, 29
MAX_PHNUM = 4096
MAX_DYN = 1 << 16
MAX_STR = 4096


def host_machine():
    """e_machine of this machine's own binaries, or None when unknown."""
    return MACHINES.get(os.uname().machine)


class _Source:
    """Random access to a file (seek/read) or to bytes."""

    def __init__(self, obj):
        self.f = None
        if isinstance(obj, (bytes, bytearray, memoryview)):
            self.data = bytes(obj)
            self.size = len(self.data)
        else:
            self.data = None
            self.f = open(obj, "rb")
            self.size = os.fstat(self.f.fileno()).st_size

    def read(self, off, n):
        if off < 0 or n < 0 or off + n > self.size:
            raise ValueError(f"ELF: read of {n} bytes at {off} outside the file")
        if self.data is not None:
            return self.data[off:off + n]
        self.f.seek(off)
        b = self.f.read(n)
        if len(b) != n:
            raise ValueError("ELF: short read")
        return b

    def cstr(self, off, limit):
        """NUL-terminated string at off, before limit."""
        end = min(limit, self.size, off + MAX_STR)
        if off < 0 or off >= end:
            raise ValueError("ELF: string outside the string table")
        chunk = self.read(off, end - off)
        i = chunk.find(b"\0")
        if i < 0:
            raise ValueError("ELF: unterminated string")
        return os.fsdecode(chunk[:i])

    def close(self):
        if self.f is not None:
            self.f.close()


def _ident(b):
    if len(b) < 20 or b[:4] != b"\x7fELF":
        raise ValueError("not an ELF file")
    cls, data = b[4], b[5]
    if cls not in (1, 2):
        raise ValueError(f"ELF: bad class {cls}")
    if data not in (1, 2):
        raise ValueError(f"ELF: bad data encoding {data}")
    bo = "<" if data == 1 else ">"
    machine, = struct.unpack_from(bo + "H", b, 18)
    return (32 if cls == 1 else 64), bo, machine


def header(path_or_bytes):
    """(elfclass, byteorder '<'|'>', e_machine) from the first 20 bytes."""
    if isinstance(path_or_bytes, (bytes, bytearray, memoryview)):
        return _ident(bytes(path_or_bytes[:20]))
    with open(path_or_bytes, "rb") as f:
        return _ident(f.read(20))


def info(path_or_bytes):
    """ElfInfo of a file path or of its bytes; ValueError when it is not a sane ELF."""
    src = _Source(path_or_bytes)
    try:
        return _info(src)
    except struct.error as e:
        raise ValueError(f"ELF: {e}") from None
    finally:
        src.close()


def _info(src):
    elfclass, bo, machine = _ident(src.read(0, min(20, src.size)))
    if elfclass == 64:
        hdr = src.read(0, 64)
        phoff, = struct.unpack_from(bo + "Q", hdr, 32)
        phentsize, phnum = struct.unpack_from(bo + "HH", hdr, 54)
        ph_fmt, ph_min = bo + "IIQQQQQQ", 56
        dyn_fmt = bo + "qQ"
    else:
        hdr = src.read(0, 52)
        phoff, = struct.unpack_from(bo + "I", hdr, 28)
        phentsize, phnum = struct.unpack_from(bo + "HH", hdr, 42)
        ph_fmt, ph_min = bo + "IIIIIIII", 32
        dyn_fmt = bo + "iI"
    dyn_size = struct.calcsize(dyn_fmt)
    if phnum == 0:
        return ElfInfo(elfclass, machine, None, [], None, None)
    if phnum > MAX_PHNUM or phentsize < ph_min:
        raise ValueError("ELF: bad program header table")
    table = src.read(phoff, phentsize * phnum)
    loads = []                      # (vaddr, offset, filesz)
    dynamic = None                  # (offset, filesz)
    for i in range(phnum):
        f = struct.unpack_from(ph_fmt, table, i * phentsize)
        if elfclass == 64:
            p_type, _flags, p_offset, p_vaddr, _paddr, p_filesz = f[:6]
        else:
            p_type, p_offset, p_vaddr, _paddr, p_filesz = f[:5]
        if p_type == PT_LOAD:
            loads.append((p_vaddr, p_offset, p_filesz))
        elif p_type == PT_DYNAMIC and dynamic is None:
            dynamic = (p_offset, p_filesz)
    if dynamic is None:
        return ElfInfo(elfclass, machine, None, [], None, None)
    off, size = dynamic
    count = min(size // dyn_size, MAX_DYN, max(0, (src.size - off) // dyn_size))
    raw = src.read(off, count * dyn_size)
    strtab = strsz = None
    needed, soname, rpath, runpath = [], None, None, None
    for tag, val in struct.iter_unpack(dyn_fmt, raw):
        if tag == DT_NULL:
            break
        if tag == DT_NEEDED:
            needed.append(val)
        elif tag == DT_STRTAB:
            strtab = val
        elif tag == DT_STRSZ:
            strsz = val
        elif tag == DT_SONAME:
            soname = val
        elif tag == DT_RPATH:
            rpath = val
        elif tag == DT_RUNPATH:
            runpath = val
    if strtab is None:
        if needed or soname is not None or rpath is not None or runpath is not None:
            raise ValueError("ELF: dynamic section without DT_STRTAB")
        return ElfInfo(elfclass, machine, None, [], None, None)
    # DT_STRTAB is a virtual address: map it to a file offset through PT_LOAD.
    stroff = None
    for vaddr, offset, filesz in loads:
        if vaddr <= strtab < vaddr + filesz:
            stroff = offset + (strtab - vaddr)
            break
    if stroff is None:
        raise ValueError("ELF: DT_STRTAB outside every PT_LOAD segment")
    limit = stroff + strsz if strsz else src.size

    def s(v):
        return None if v is None else src.cstr(stroff + v, limit)

    return ElfInfo(elfclass, machine, s(soname), [s(v) for v in needed], s(rpath), s(runpath))
