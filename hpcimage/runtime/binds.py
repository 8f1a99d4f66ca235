"""Bind specs made mounts (the steps in runtime/steps.py call these), and --no-mount.

The grammar (comma lists, `\\,` and `\\:` escapes, the options ro, rw, image-src=PATH,
id=N) is config.bindspec's, shared with site.yaml. Here: a spec resolved against the
caller's directory (a relative source binds at its absolute path), an image bind made
a MountData op plus the Bind of the path inside it, and the --no-mount names
(Apptainer's: proc, sys, dev, devpts, home, tmp, hostfs, cwd, bind-paths, or the
absolute destination of a default or site bind). Standard library only: hot path.
"""
import os

from hpcimage.errors import UsageError
from hpcimage.runtime.ops import Bind, MountData

NO_MOUNT = ("proc", "sys", "dev", "devpts", "home", "tmp", "hostfs", "cwd", "bind-paths")

__all__ = ("NO_MOUNT", "no_mount", "split_list", "spec_bind", "add_spec", "skipped")


def split_list(text):
    """config.bindspec.split_list (imported only where there is a spec to read)."""
    if not text:
        return []
    from hpcimage.config.bindspec import split_list as split
    return split(text)


def no_mount(opts):
    """The --no-mount names of opts (a frozenset; absolute paths normalised). A name
    that is neither one of NO_MOUNT nor an absolute path is an error (exit 2), where
    Apptainer warns and goes on."""
    out = set()
    for item in getattr(opts, "no_mount", None) or ():
        for v in item.split(","):
            v = v.strip()
            if not v:
                continue
            if v.startswith("/"):
                out.add(os.path.normpath(v))
            elif v in NO_MOUNT:
                out.add(v)
            else:
                raise UsageError(f"--no-mount {v}: not a mount hpcimage can leave out "
                                 f"({', '.join(NO_MOUNT)}, or the absolute path of a "
                                 "default or site bind)")
    return frozenset(out)


def skipped(dst, names, bind_path=True):
    """A default or site bind at dst is left out: --no-mount names dst, or (bind_path:
    an entry of Apptainer's `bind path` list, the site's binds) bind-paths."""
    return dst in names or (bind_path and "bind-paths" in names)


def spec_bind(spec, what, cwd, data_at):
    """(MountData op or None, Bind) of one spec (UsageError for a bad one). cwd: the
    caller's directory (None when deleted), for a relative source; data_at: where an
    image bind's file system is mounted (below the session directory)."""
    from hpcimage.config.bindspec import parse as parse_spec
    try:
        s = parse_spec(spec)
    except ValueError as e:
        raise UsageError(str(e)) from None
    src = s.src
    if not src.startswith("/"):
        if cwd is None:
            raise UsageError(f"bind {spec!r}: relative source {src!r} while the current "
                             "directory is deleted")
        src = os.path.join(cwd, src)
    src = os.path.normpath(src)
    dst = os.path.normpath(s.dst) if s.dst else src
    if not s.is_image or not os.path.exists(src):     # add_spec: a missing source
        return None, Bind(src, dst, s.ro, what)
    from hpcimage.image import data
    fs = data.locate(src, s.part_id, spec)
    ro = s.ro or fs.kind == "squashfs"
    inner = s.image_src.rstrip("/")
    return (MountData(fs, data_at, ro, s.image_src),
            Bind(data_at + inner, dst, ro, f"{what}, {s.image_src} of {src}"))


def add_spec(p, spec, what, cwd, session_dir, missing_ok):
    """Add spec's mounts to plan p (an image bind's file system below session_dir's
    data-images/); return the Bind, or None where the source is missing and missing_ok
    (else an error)."""
    n = sum(1 for op in p.ops if type(op) is MountData)
    mnt, b = spec_bind(spec, what, cwd, f"{session_dir}/data-images/{n}")
    if mnt is None and not os.path.exists(b.src):
        if missing_ok:
            return None
        raise UsageError(f"bind source {b.src} does not exist")
    if mnt is not None:
        p.add(mnt)
    p.binds.append(b)
    return b
