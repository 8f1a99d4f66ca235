"""Linux system calls that Python 3.9-3.11 lacks, through ctypes.

Each wrapper raises OSError with errno and a message naming the call and path.
Standard library only: this module is on the hot path.
"""
import ctypes
import os

_libc = ctypes.CDLL(None, use_errno=True)

CLONE_NEWNS = 0x00020000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWUTS = 0x04000000

MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
MS_NOEXEC = 8
MS_REMOUNT = 32
MS_BIND = 4096
MS_MOVE = 8192
MS_REC = 16384
MS_PRIVATE = 1 << 18
MS_SLAVE = 1 << 19

MNT_DETACH = 2

PR_SET_PDEATHSIG = 1
PR_SET_CHILD_SUBREAPER = 36

_SYS_PIVOT_ROOT = {"x86_64": 155, "aarch64": 41, "ppc64le": 203, "riscv64": 41}

_libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p,
                        ctypes.c_ulong, ctypes.c_char_p]
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
_libc.unshare.argtypes = [ctypes.c_int]
_libc.setns.argtypes = [ctypes.c_int, ctypes.c_int]
_libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong,
                        ctypes.c_ulong, ctypes.c_ulong]


def _b(s):
    if s is None:
        return None
    return s if isinstance(s, bytes) else os.fsencode(s)


def _check(ret, what, path=None):
    if ret != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}", path)


def unshare(flags):
    _check(_libc.unshare(flags), "unshare")


def setns(fd, nstype=0):
    _check(_libc.setns(fd, nstype), "setns")


def mount(source, target, fstype=None, flags=0, data=None):
    _check(_libc.mount(_b(source), _b(target), _b(fstype), flags, _b(data)),
           "mount", target)


def umount2(target, flags=0):
    _check(_libc.umount2(_b(target), flags), "umount2", target)


def pivot_root(new_root, put_old):
    nr = _SYS_PIVOT_ROOT.get(os.uname().machine)
    if nr is None:
        raise OSError(38, "pivot_root: unsupported architecture")
    _check(_libc.syscall(nr, _b(new_root), _b(put_old)), "pivot_root", new_root)


def fstype(path):
    """statfs(2)'s f_type of the file system holding path (its magic number)."""
    buf = ctypes.create_string_buffer(256)     # struct statfs (120 bytes on 64-bit); f_type first
    _check(_libc.statfs(_b(path), buf), "statfs", path)
    return ctypes.c_long.from_buffer(buf).value & 0xFFFFFFFF


PR_SET_NAME = 15


def set_name(name):
    """The calling thread's name (comm, at most 15 bytes), as ps and /proc show it."""
    _check(_libc.prctl(PR_SET_NAME, ctypes.cast(ctypes.c_char_p(_b(name)), ctypes.c_void_p).value
                       or 0, 0, 0, 0), "prctl")


def sethostname(name):
    b = _b(name)
    _check(_libc.sethostname(b, len(b)), "sethostname")


def prctl(option, arg2=0):
    _check(_libc.prctl(option, arg2, 0, 0, 0), "prctl")


CAP_SYS_ADMIN = 21
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_RAISE = 2
_LINUX_CAPABILITY_VERSION_3 = 0x20080522


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32),
                ("inheritable", ctypes.c_uint32)]


def ambient_cap(cap):
    """Keep capability cap (held in this process's user namespace) across execve: add
    it to the inheritable set, then raise it in the ambient set (a helper that must
    mount, e.g. fuse2fs, in the launcher's user namespace). Raises OSError."""
    hdr = _CapHeader(_LINUX_CAPABILITY_VERSION_3, 0)
    data = (_CapData * 2)()
    _check(_libc.capget(ctypes.byref(hdr), data), "capget")
    data[cap // 32].inheritable |= 1 << (cap % 32)
    _check(_libc.capset(ctypes.byref(hdr), data), "capset")
    _check(_libc.prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_RAISE, cap, 0, 0), "prctl")


def read_to_end(fd):
    """Everything from the pipe or file fd up to end of file, as bytes; closes fd (the
    reports of the helper processes a launch forks). Raises OSError."""
    chunks = []
    try:
        while True:
            chunk = os.read(fd, 65536)
            if not chunk:
                return b"".join(chunks)
            chunks.append(chunk)
    finally:
        os.close(fd)
