"""How an unprivileged user namespace maps ids: subordinate ids (/etc/subuid,
/etc/subgid with newuidmap/newgidmap), a single id, or none (root)."""
import grp
import os
import pwd

from hpcimage.errors import HpcimageError
from hpcimage.linux.paths import which


MAX_SUBIDS = 65536


def _subid_range(path, name, ident):
    """(start, count) of the first range of NAME (or numeric IDENT) in PATH."""
    try:
        with open(path) as f:
            for ln in f:
                parts = ln.strip().split(":")
                if len(parts) != 3 or parts[0] not in (name, str(ident)):
                    continue
                try:
                    start, count = int(parts[1]), int(parts[2])
                except ValueError:
                    continue
                if count > 0:
                    return start, min(count, MAX_SUBIDS)
    except OSError:
        pass
    return None


class IdMap:
    """How the build namespace maps ids (module doc)."""

    def __init__(self, mode, uid=0, gid=0, subuid=None, subgid=None, why=""):
        self.mode, self.uid, self.gid = mode, uid, gid
        self.subuid, self.subgid, self.why = subuid, subgid, why

    @classmethod
    def choose(cls, want=None):
        want = want or os.environ.get("HPCIMAGE_BUILD_IDMAP", "auto")
        uid, gid = os.getuid(), os.getgid()
        if uid == 0:
            return cls("root")
        if want not in ("auto", "subid", "single"):
            raise HpcimageError(f"HPCIMAGE_BUILD_IDMAP={want}: want auto, subid or single",
                                2)
        if want == "single":
            return cls("single", uid, gid, why="HPCIMAGE_BUILD_IDMAP=single")
        try:
            name = pwd.getpwuid(uid).pw_name
        except KeyError:
            name = str(uid)
        try:
            gname = grp.getgrgid(gid).gr_name
        except KeyError:
            gname = str(gid)
        su = _subid_range("/etc/subuid", name, uid)
        sg = _subid_range("/etc/subgid", name, uid) or _subid_range("/etc/subgid", gname, gid)
        path = os.environ.get("PATH") or os.defpath
        helpers = which("newuidmap", path) and which("newgidmap", path)
        why = ("" if su and sg and helpers else
               "newuidmap/newgidmap not found (install uidmap)" if not helpers else
               f"no subordinate ids for {name} in /etc/subuid and /etc/subgid")
        if why:
            if want == "subid":
                raise HpcimageError(f"build: cannot map subordinate ids: {why}")
            return cls("single", uid, gid, why=why)
        return cls("subid", uid, gid, su, sg)

    def describe(self):
        if self.mode == "root":
            return "root: no user namespace"
        if self.mode == "single":
            return f"single id: uid {self.uid} -> 0, gid {self.gid} -> 0 ({self.why})"
        return (f"subordinate ids: uid {self.uid} -> 0, {self.subuid[0]}.. -> 1..{self.subuid[1]}; "
                f"gid {self.gid} -> 0, {self.subgid[0]}.. -> 1..{self.subgid[1]}")

    def to_json(self):
        return dict(mode=self.mode, uid=self.uid, gid=self.gid, subuid=self.subuid,
                    subgid=self.subgid, why=self.why)
