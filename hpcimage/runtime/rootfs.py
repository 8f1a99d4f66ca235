"""The container's root: the id maps, the tmpfs skeleton that mirrors the image and adds
the bind targets it lacks, the generated passwd and group, read-only remounts.
Standard library only: the hot path."""
import os
import stat

from hpcimage.linux import syscalls as sc
from hpcimage.linux.paths import resolve_in


ST_RELATIME = 4096


MS_RELATIME = 1 << 21


def _write(path, data):
    with open(path, "w") as f:
        f.write(data)


def map_ids(uid, gid):
    _write("/proc/self/setgroups", "deny")
    _write("/proc/self/uid_map", f"{uid} {uid} 1\n")
    _write("/proc/self/gid_map", f"{gid} {gid} 1\n")


def remount_ro(path):
    f = os.statvfs(path).f_flag
    flags = sc.MS_REMOUNT | sc.MS_BIND | sc.MS_RDONLY
    flags |= f & (sc.MS_NOSUID | sc.MS_NODEV | sc.MS_NOEXEC | 1024 | 2048)
    if f & ST_RELATIME:
        flags |= MS_RELATIME
    sc.mount(None, path, None, flags)


def build_root(image_dir, root, targets, in_image=False):
    """Make root: the image itself when every bind target exists in it, else a tmpfs
    skeleton (root sits on the session tmpfs) mirroring the image with binds, in which
    the missing targets are created. Works on any kernel with user namespaces.
    in_image (a sandbox under --writable): the image itself always; the binds make
    their missing targets in it (a skeleton would shadow the sandbox's directories:
    what is written there would be lost)."""
    os.mkdir(root)
    if in_image:
        sc.mount(image_dir, root, None, sc.MS_BIND | sc.MS_REC)
        return
    missing = []
    for dst in targets:
        rel = resolve_in(image_dir, dst)
        if rel and not os.path.lexists(os.path.join(image_dir, rel)):
            missing.append(rel)
    if not missing:
        sc.mount(image_dir, root, None, sc.MS_BIND | sc.MS_REC)
        return
    expand = {""}
    for rel in missing:
        parts = rel.split("/")
        for k in range(1, len(parts)):
            anc = "/".join(parts[:k])
            if os.path.isdir(os.path.join(image_dir, anc)) and not os.path.islink(
                    os.path.join(image_dir, anc)):
                expand.add(anc)
            else:
                break
    _skeleton(image_dir, root, "", expand)
    sc.mount(root, root, None, sc.MS_BIND | sc.MS_REC)   # a mount point, for pivot_root


def _skeleton(image_dir, root, rel, expand):
    src_dir = os.path.join(image_dir, rel)
    dst_dir = os.path.join(root, rel)
    try:
        st = os.stat(src_dir)
        os.chmod(dst_dir, stat.S_IMODE(st.st_mode) | 0o700)
    except OSError:
        pass
    for e in os.scandir(src_dir):
        r = f"{rel}/{e.name}" if rel else e.name
        s, d = e.path, os.path.join(dst_dir, e.name)
        if e.is_symlink():
            os.symlink(os.readlink(s), d)
        elif r in expand:
            os.mkdir(d)
            _skeleton(image_dir, root, r, expand)
        elif e.is_dir():
            os.mkdir(d)
            sc.mount(s, d, None, sc.MS_BIND | sc.MS_REC)
        else:
            os.close(os.open(d, os.O_CREAT | os.O_WRONLY, 0o600))
            sc.mount(s, d, None, sc.MS_BIND)


def make_target(root, dst, is_dir):
    rel = resolve_in(root, dst)
    path = os.path.join(root, rel)
    if os.path.lexists(path):
        return path
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    if is_dir:
        os.mkdir(path)
    else:
        os.close(os.open(path, os.O_CREAT | os.O_WRONLY, 0o644))
    return path


def write_identity_files(base, image_root, uid, gid, user, home, gecos, shell, group):
    def read(name):
        try:
            with open(os.path.join(image_root, resolve_in(image_root, name)),
                      errors="replace") as f:
                return f.read()
        except OSError:
            return ""
    passwd = read("/etc/passwd")
    if passwd and not passwd.endswith("\n"):
        passwd += "\n"
    lines = passwd.splitlines()
    if not any(ln.split(":")[2:3] == [str(uid)] for ln in lines):
        passwd += f"{user}:x:{uid}:{gid}:{gecos.replace(':', ' ')}:{home}:{shell or '/bin/sh'}\n"
    groups = read("/etc/group")
    if groups and not groups.endswith("\n"):
        groups += "\n"
    if not any(ln.split(":")[2:3] == [str(gid)] for ln in groups.splitlines()):
        groups += f"{group}:x:{gid}:{user}\n"
    _write(base + "/passwd", passwd)
    _write(base + "/group", groups)
