"""Recognise an image file and mount it: directory (sandbox), SquashFS, SIF.

Standard library only: imported by the runtime on the hot path. Mounting an image
file is done by `hpcimage.image.squashfs` inside the caller's mount namespace.
"""
import os

from hpcimage.errors import UsageError
from hpcimage.image.magic import HEAD_SIZE, head_kind


class Image:
    """An image the runtime can start: where it is, what kind, where its SquashFS is."""

    __slots__ = ("path", "kind", "offset", "size", "arch", "crypt")

    def __init__(self, path, kind, offset=0, size=None, arch=None, crypt=None):
        self.path = path
        # None, or how the SIF's partition is encrypted: "passphrase" or "pem"; the
        # SquashFS at offset then holds gocryptfs.conf and the encrypted image
        self.crypt = crypt
        self.arch = arch        # what a SIF says it was built for (Go's name), else None
        self.kind = kind        # "sandbox" | "squashfs" | "sif"
        self.offset = offset    # byte offset of the SquashFS inside the file
        self.size = size

    @property
    def needs_mount(self):
        return self.kind != "sandbox"

    def __repr__(self):
        if self.kind == "sif":
            return (f"sif {self.path} ({'encrypted ' if self.crypt else ''}squashfs at "
                    f"offset {self.offset})")
        return f"{self.kind} {self.path}"


def sniff(path):
    """Return 'sandbox', 'squashfs', 'sif' or None for the file at path."""
    if os.path.isdir(path):
        return "sandbox"
    with open(path, "rb") as f:
        head = f.read(HEAD_SIZE)
    return head_kind(head)


def open_image(path, check_arch=True):
    """Open the image at path; UsageError (exit 2) when it is missing or unknown, or
    (check_arch) a SIF built for an architecture this node cannot run (image.arch)."""
    if not path:
        raise UsageError("no image given")
    path = os.path.abspath(path)
    try:
        kind = sniff(path)
    except FileNotFoundError:
        raise UsageError(f"{path}: image not found") from None
    except PermissionError:
        raise UsageError(f"{path}: image not readable (permission denied)") from None
    except IsADirectoryError:
        kind = "sandbox"
    except OSError as e:
        raise UsageError(f"{path}: cannot read image: {e.strerror}") from None
    if kind == "sandbox":
        if not os.access(path, os.R_OK | os.X_OK):
            raise UsageError(f"{path}: image directory not readable (permission denied)")
        return Image(path, "sandbox")
    if kind == "squashfs":
        return Image(path, "squashfs", 0, os.path.getsize(path))
    if kind == "sif":
        from hpcimage.image import sif
        offset, size, arch, crypt = sif.primary_squashfs(path, with_arch=True)
        if check_arch:
            from hpcimage.image import arch as archmod
            archmod.check(path, arch)
        return Image(path, "sif", offset, size, arch, crypt)
    raise UsageError(f"{path}: not an image (neither a directory, a SquashFS file nor a SIF file)")
