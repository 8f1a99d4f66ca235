"""Bootstrap agents: the `Bootstrap:` line of a stage -> a root tree at ROOT.

    localimage      From: a SIF, SquashFS or sandbox directory (relative to the cwd)
    scratch         an empty tree
    busybox         the host's busybox-static (no download; MirrorURL is ignored)
    debootstrap     OSVersion: suite, MirrorURL: mirror, Include: packages
    docker-archive  From: a `docker save` tarball
    oci-archive     From: an OCI layout tarball[:tag]
    oci             From: an OCI layout directory[:tag]
    docker          From: [registry/]repository[:tag|@digest] (Docker Registry API v2)
    oras            From: registry/repository:tag holding a SIF (ORAS)

All run inside the build namespace (hpcimage.imagebuild.userns) as its root.
"""
import os
import stat

from hpcimage.imagebuild import convert
from hpcimage.errors import HpcimageError, UsageError


def bootstrap(st, root, job):
    agent = st.bootstrap
    frm = st.get("from", "")
    line = st.header_lines.get("from", st.line)
    where = f"{job.d.path}:{line}"
    if agent == "scratch":
        os.makedirs(root)
    elif agent == "busybox":
        from hpcimage.imagebuild import busybox
        os.makedirs(root)
        busybox.populate(root)
    elif agent == "localimage":
        localimage(os.path.join(job.cwd, frm), root, where)
    elif agent == "debootstrap":
        from hpcimage.imagebuild import debootstrap
        include = [p for p in st.get("include", "").replace(",", " ").split() if p]
        debootstrap.into(root, st.get("osversion"), st.get("mirrorurl") or
                         debootstrap.DEFAULT_MIRROR, include, where=where,
                         verbose=getattr(job, "verbose", False))
    elif agent in ("docker-archive", "oci-archive", "oci"):
        from hpcimage.imagebuild import oci
        path, _, ref = frm.partition(":") if agent != "docker-archive" else (frm, "", "")
        path = os.path.join(job.cwd, path)
        if not os.path.exists(path):
            raise UsageError(f"{where}: From: {path}: no such file or directory")
        if agent == "docker-archive":
            img = oci.open_docker_archive(path, where)
        elif agent == "oci-archive":
            img = oci.open_oci_archive(path, ref or None, where)
        else:
            img = oci.open_oci_layout(path, ref or None, where)
        with img:
            os.makedirs(root)
            img.unpack(root)
    elif agent == "docker":
        from hpcimage.imagebuild import oci, registry
        ref = registry.Reference.parse(frm, st.get("registry"), st.get("namespace"), where)
        img = registry.pull(ref, where)
        with img:
            os.makedirs(root)
            img.unpack(root)
    elif agent == "oras":
        from hpcimage.imagebuild import registry
        ref = registry.Reference.parse(frm.removeprefix("//"), st.get("registry"), None,
                                       where, docker_hub=False)
        sif = registry.pull_sif(ref, where)
        localimage(sif, root, where)
    else:
        raise UsageError(f"{where}: Bootstrap: {agent} is not supported")


def localimage(src, root, where):
    try:
        s = convert.resolve_source(src)
    except UsageError as e:
        raise UsageError(f"{where}: From: {e.message}") from None
    if s.kind == "dir":
        copy_tree(s.path, root)
    elif s.kind == "squashfs":
        convert.squashfs_to_sandbox(s.path, root)
    else:
        from hpcimage.image import sif
        offset, _ = sif.primary_squashfs(s.path)
        convert.squashfs_to_sandbox(s.path, root, offset=offset)
    os.chmod(root, 0o755)


def _overflow_uid():
    try:
        with open("/proc/sys/kernel/overflowuid") as f:
            return int(f.read())
    except (OSError, ValueError):
        return 65534


def copy_tree(src, dst):
    """Copy the tree SRC to DST (which must not exist): files, directories, symlinks,
    hard links, modes, times, owners. Owners outside the namespace's map (they show
    as the overflow id) become root; an owner that cannot be set (one mapped id) is
    left as root. Device nodes and sockets are skipped (/dev is bound at run time)."""
    overflow = _overflow_uid()
    links = {}
    os.mkdir(dst, 0o700)

    def owner(st, path):
        uid = 0 if st.st_uid == overflow else st.st_uid
        gid = 0 if st.st_gid == overflow else st.st_gid
        if uid or gid:
            try:
                os.lchown(path, uid, gid)
            except OSError:
                pass

    def walk(s, d):
        with os.scandir(s) as it:
            entries = list(it)
        for e in entries:
            sp, dp = e.path, os.path.join(d, e.name)
            st = e.stat(follow_symlinks=False)
            mode = st.st_mode
            if stat.S_ISDIR(mode):
                os.mkdir(dp, 0o700)
                walk(sp, dp)
            elif stat.S_ISLNK(mode):
                os.symlink(os.readlink(sp), dp)
                owner(st, dp)
                continue
            elif stat.S_ISREG(mode):
                key = (st.st_dev, st.st_ino)
                if st.st_nlink > 1 and key in links:
                    os.link(links[key], dp)
                    continue
                _copy_file(sp, dp)
                if st.st_nlink > 1:
                    links[key] = dp
            elif stat.S_ISFIFO(mode):
                os.mkfifo(dp)
            else:
                continue
            owner(st, dp)
            os.chmod(dp, stat.S_IMODE(mode))
            os.utime(dp, ns=(st.st_atime_ns, st.st_mtime_ns))
    walk(src, dst)
    st = os.stat(src)
    os.chmod(dst, stat.S_IMODE(st.st_mode))


def _copy_file(src, dst):
    sfd = os.open(src, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    try:
        dfd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            while True:
                try:
                    n = os.copy_file_range(sfd, dfd, 1 << 30)
                except OSError:
                    n = -1
                if n <= 0:
                    break
            if n < 0:
                os.lseek(sfd, 0, 0)
                os.lseek(dfd, 0, 0)
                os.ftruncate(dfd, 0)
                while True:
                    b = os.read(sfd, 1 << 20)
                    if not b:
                        break
                    os.write(dfd, b)
        finally:
            os.close(dfd)
    except OSError as e:
        raise HpcimageError(f"copying {src}: {e.strerror}") from None
    finally:
        os.close(sfd)
