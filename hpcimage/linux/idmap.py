"""How an unprivileged user namespace maps ids: subordinate ids (/etc/subuid,
/etc/subgid with newuidmap/newgidmap), a single id, or none (root). Shared by the
build (imagebuild.userns) and the runtime's --fakeroot (runtime.ops.UserNs): `subids`
finds a user's ranges and the helpers, `write_maps` writes a process's maps with
them (os.posix_spawn: no subprocess, the runtime imports this). Standard library only."""
import grp
import os
import pwd

from hpcimage.errors import HpcimageError
from hpcimage.linux.paths import which
from hpcimage.linux.syscalls import read_to_end


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


def subids(uid, gid, path=None):
    """(subuid range, subgid range, why not): the ranges of the user uid (by name or
    number) in /etc/subuid and /etc/subgid (the group's too for subgid), why is "" when
    both exist and newuidmap/newgidmap are on path (PATH, else os.defpath)."""
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
    path = path or os.defpath
    helpers = which("newuidmap", path) and which("newgidmap", path)
    why = ("" if su and sg and helpers else
           "newuidmap/newgidmap not found (install uidmap)" if not helpers else
           f"no subordinate ids for {name} in /etc/subuid and /etc/subgid")
    return su, sg, why


class IdMap:
    """How a namespace maps ids (module doc): mode "root", "single" or "subid"."""

    def __init__(self, mode, uid=0, gid=0, subuid=None, subgid=None, why=""):
        self.mode, self.uid, self.gid = mode, uid, gid
        self.subuid, self.subgid, self.why = subuid, subgid, why

    def __eq__(self, other):
        return type(other) is IdMap and self.to_json() == other.to_json()

    __hash__ = None

    def __repr__(self):
        return f"IdMap({self.describe()})"

    @classmethod
    def fakeroot(cls, uid, gid, path=None):
        """--fakeroot's map of uid/gid: subordinate ids where the user has them and the
        helpers exist, else a single id (why says what is missing)."""
        su, sg, why = subids(uid, gid, path)
        if why:
            return cls("single", uid, gid, why=why)
        return cls("subid", uid, gid, su, sg)

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
        su, sg, why = subids(uid, gid, os.environ.get("PATH"))
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


def write_maps(pid, m, what="build"):
    """Write the uid and gid maps of process PID (which has unshared its user
    namespace) as m says: a single id written directly (setgroups denied), subordinate
    ids by newuidmap/newgidmap (run side by side, stdin /dev/null, their output kept
    for the error; every signal at its default, none blocked). Raises HpcimageError
    ("WHAT: newuidmap failed: ...")."""
    if m.mode == "single":
        for name, text in (("setgroups", "deny"), ("uid_map", f"0 {m.uid} 1\n"),
                           ("gid_map", f"0 {m.gid} 1\n")):
            with open(f"/proc/{pid}/{name}", "w") as f:
                f.write(text)
        return
    import signal
    path = os.environ.get("PATH") or os.defpath
    sigs = set(signal.valid_signals()) - {signal.SIGKILL, signal.SIGSTOP}
    procs = []
    for tool, own, (start, count) in (("newuidmap", m.uid, m.subuid),
                                      ("newgidmap", m.gid, m.subgid)):
        exe = which(tool, path) or tool
        r, w = os.pipe()
        try:
            child = os.posix_spawn(exe, [tool, str(pid), "0", str(own), "1", "1",
                                         str(start), str(count)], os.environ,
                                   file_actions=[(os.POSIX_SPAWN_OPEN, 0, "/dev/null",
                                                  os.O_RDONLY, 0),
                                                 (os.POSIX_SPAWN_DUP2, w, 1),
                                                 (os.POSIX_SPAWN_DUP2, w, 2),
                                                 (os.POSIX_SPAWN_CLOSE, r)],
                                   setsigdef=sigs, setsigmask=())
        except OSError as e:
            os.close(r)
            os.close(w)
            raise HpcimageError(f"{what}: {tool}: {e.strerror}") from None
        os.close(w)
        procs.append((tool, child, r))
    errors = []
    for tool, child, r in procs:
        out = read_to_end(r)
        st = os.waitpid(child, 0)[1]
        if st != 0:
            out = out.decode(errors="replace").strip() or "?"
            errors.append(f"{what}: {tool} failed: {out.splitlines()[-1]}")
    if errors:
        raise HpcimageError(errors[0])
