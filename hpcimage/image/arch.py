"""Whether an image can run on this node's architecture. Standard library only (hot path).

A SIF says in its header (and its primary partition's descriptor) what it was built
for: `open_image` refuses a foreign one before anything starts, as Apptainer does
("the image's architecture (arm64) could not run on the host's (amd64)"). A directory
or SquashFS image says nothing about itself; once it is mounted (the launch mounts it
anyway), the ELF header of its /bin/sh tells, for ~20 microseconds. Names are Go's
(amd64, arm64, ...), as SIF and Apptainer write them.

Compatible besides the same architecture: 386 on amd64, arm on arm64 (as Apptainer's
machine.CompatibleWith), and any architecture for which binfmt_misc has a persistent
('F' flag) emulator registered (qemu-user-static), which then runs inside the container.
"""
import os

from hpcimage.errors import HpcimageError, UsageError

# os.uname().machine -> Go architecture name.
MACHINE_GOARCH = {
    "x86_64": "amd64", "amd64": "amd64",
    "i386": "386", "i486": "386", "i586": "386", "i686": "386",
    "aarch64": "arm64", "arm64": "arm64",
    "armv6l": "arm", "armv7l": "arm", "armv8l": "arm",
    "ppc64": "ppc64", "ppc64le": "ppc64le",
    "mips": "mips", "mips64": "mips64",
    "s390x": "s390x", "riscv64": "riscv64",
}
_COMPATIBLE = {"amd64": ("386",), "arm64": ("arm",)}
_QEMU = {"amd64": "x86_64", "386": "i386", "arm64": "aarch64", "arm": "arm",
         "ppc64": "ppc64", "ppc64le": "ppc64le", "s390x": "s390x", "riscv64": "riscv64",
         "mips": "mips", "mipsle": "mipsel", "mips64": "mips64", "mips64le": "mips64el"}
# ELF e_machine -> Go name (by class and byte order where one machine has several).
_ELF = {62: "amd64", 3: "386", 183: "arm64", 40: "arm", 22: "s390x"}
BINFMT_DIR = "/proc/sys/fs/binfmt_misc"


def host():
    """This node's architecture (Go's name), None when unknown."""
    return MACHINE_GOARCH.get(os.uname().machine)


def runs_here(arch, here=None):
    """True when an image built for arch (Go's name) can run on this node."""
    here = here or host()
    if not arch or arch == "unknown" or here is None or arch == here:
        return True
    if arch in _COMPATIBLE.get(here, ()):
        return True
    return _emulated(arch)


def _emulated(arch):
    name = _QEMU.get(arch)
    if not name:
        return False
    try:
        with open(f"{BINFMT_DIR}/qemu-{name}") as f:
            lines = f.read().splitlines()
    except OSError:
        return False
    flags = next((ln.split(None, 1)[1] for ln in lines if ln.startswith("flags:")
                  and len(ln.split(None, 1)) > 1), "")
    return bool(lines) and lines[0] == "enabled" and "F" in flags


def check(path, arch):
    """UsageError (exit 2) when the image at path, built for arch, cannot run here."""
    here = host()
    if not runs_here(arch, here):
        raise UsageError(f"{path}: image built for {arch}, this node is {here}")


def elf_arch(root, name="/bin/sh"):
    """The architecture of the ELF file name inside the tree at root (symbolic links
    resolved inside root, as a chroot would), None when it is missing or not ELF."""
    path = _resolve(root, name)
    if path is None:
        return None
    try:
        with open(path, "rb") as f:
            head = f.read(20)
    except OSError:
        return None
    if len(head) < 20 or head[:4] != b"\x7fELF":
        return None
    bits64, little = head[4] == 2, head[5] == 1
    machine = int.from_bytes(head[18:20], "little" if little else "big")
    if machine == 21:
        return "ppc64le" if little else "ppc64"
    if machine == 8:
        return ("mips64" if bits64 else "mips") + ("le" if little else "")
    if machine == 243:
        return "riscv64" if bits64 else None
    return _ELF.get(machine)


def check_tree(path, root):
    """check() for a mounted image (a directory at root) by the ELF header of /bin/sh."""
    arch = elf_arch(root)
    if arch is not None:
        check(path, arch)


def _resolve(root, name):
    """name resolved inside root with chroot semantics (hpcimage.linux.paths), as a host
    path; None for a loop of symbolic links."""
    from hpcimage.linux.paths import resolve_in
    try:
        rel = resolve_in(root, name)
    except HpcimageError:
        return None
    return os.path.join(root, rel) if rel else root
