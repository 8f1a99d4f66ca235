"""Paths: chroot-style resolution inside a tree (an absolute symbolic link points into
the tree, `..` stops at its top), and a program's lookup on a PATH. Standard library
only."""
import os

from hpcimage.errors import HpcimageError


def resolve_in(root, path):
    """path resolved inside root with chroot semantics; returns it relative to root."""
    parts = [c for c in path.split("/") if c and c != "."]
    out = []
    hops = 0
    while parts:
        c = parts.pop(0)
        if c == "..":
            if out:
                out.pop()
            continue
        cand = os.path.join(root, *out, c)
        if os.path.islink(cand):
            hops += 1
            if hops > 40:
                raise HpcimageError(f"{path}: too many levels of symbolic links in the image")
            link = os.readlink(cand)
            if link.startswith("/"):
                out = []
            parts = [x for x in link.split("/") if x and x != "."] + parts
        else:
            out.append(c)
    return "/".join(out)


def which(cmd, path):
    """cmd found on path (a colon list) as an executable file, or None."""
    if "/" in cmd:
        return cmd
    for d in path.split(":"):
        p = os.path.join(d or ".", cmd)
        if os.path.isfile(p) and os.access(p, os.X_OK):
            return p
    return None
