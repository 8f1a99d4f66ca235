"""Recognising an image file by its first bytes: the one sniffer (DESIGN.md, `image`).

    SquashFS   "hsqs" at offset 0
    SIF        "SIF_MAGIC" at offset 32 (after the launch script line; then a NUL)

Standard library only (nothing at all): on the hot path.
"""
SQUASHFS_MAGIC = b"hsqs"
SIF_MAGIC = b"SIF_MAGIC"
SIF_MAGIC_OFFSET = 32
HEAD_SIZE = 64          # enough bytes of a file for head_kind()


def head_kind(head):
    """'squashfs', 'sif' or None for a file that starts with the bytes HEAD."""
    if head[:4] == SQUASHFS_MAGIC:
        return "squashfs"
    if head[SIF_MAGIC_OFFSET:SIF_MAGIC_OFFSET + len(SIF_MAGIC)] == SIF_MAGIC:
        return "sif"
    return None
