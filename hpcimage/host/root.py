"""The host's filesystem seen from one root (HostRoot), what a discovery returns
(Contribution), and the discoveries' gates (is GPU/InfiniBand support on?). Standard
library only: on the `image-exec` hot path."""
import errno
import os
import stat

from hpcimage.config.policy import GPU_MODES, IB_MODES

_MAX_HOPS = 40

# Sonames (prefixes) of the C runtime that a host library's dependency closure never
# brings into a container: the image's own copies must stay (a second libc in one
# process breaks it). Used by the MPI bind model and by Lmod inside (host.lmod).
# Where bound host libraries go inside the container (GPU, IB, MPI bind model, Lmod).
LIBS_DIR = "/.singularity.d/libs"

NEVER_BIND = ("libc.so.", "libm.so.", "libpthread.so.", "libdl.so.", "librt.so.", "ld-linux",
              "libresolv.so.", "libutil.so.", "libgcc_s.so.", "libstdc++.so.", "libanl.so.",
              "libcrypt.so.", "libnsl.so.", "libmvec.so.")


class HostRoot:
    """The host's filesystem, seen from `root` (default: env HPCIMAGE_HOST_ROOT, else /).

    Paths given to the methods are absolute paths *on the host* (`/dev/nvidiactl`);
    `path()` turns one into the real path below the root without resolving symlinks,
    `realpath()` resolves every symlink inside the root (chroot semantics) and returns
    the real path below the root, `resolve()` the same but as a host path (inside the
    root). Queries (`exists`, `isdir`, `ischr`, ...) never raise; reads raise OSError.
    """

    __slots__ = ("root", "_prefix")

    def __init__(self, root=None, environ=None):
        if root is None:
            root = (os.environ if environ is None else environ).get("HPCIMAGE_HOST_ROOT") or "/"
        root = os.path.abspath(os.fsdecode(root))
        self.root = root
        self._prefix = "" if root == "/" else root.rstrip("/")

    def __repr__(self):
        return f"HostRoot({self.root!r})"

    @property
    def is_real(self):
        """True when the root is the machine's own `/`."""
        return not self._prefix

    # -------------------------------------------------------------- paths
    @staticmethod
    def _norm(p):
        p = os.fsdecode(p)
        if not p.startswith("/"):
            p = "/" + p
        return os.path.normpath(p).replace("//", "/")

    def path(self, p):
        """The real path of host path p below the root (symlinks not resolved)."""
        p = self._norm(p)
        return self._prefix + p if self._prefix else p

    def resolve(self, p):
        """Host path p with every symlink resolved inside the root (chroot semantics).

        Like os.path.realpath (non-strict): a missing component ends the resolution and
        the rest is appended as is. Raises OSError(ELOOP) on a symlink loop."""
        p = self._norm(p)
        if not self._prefix:
            return os.path.realpath(p)
        parts = [c for c in p.split("/") if c and c != "."]
        parts.reverse()                 # a stack: pop() takes the next component
        out = []
        hops = 0
        while parts:
            c = parts.pop()
            if c == "..":
                if out:
                    out.pop()
                continue
            cand = self._prefix + "/" + "/".join(out + [c])
            try:
                link = os.readlink(cand)
            except OSError:
                out.append(c)           # not a link, or missing: keep as is
                continue
            hops += 1
            if hops > _MAX_HOPS:
                raise OSError(errno.ELOOP, os.strerror(errno.ELOOP), p)
            if link.startswith("/"):
                out = []
            parts.extend(reversed([x for x in link.split("/") if x and x != "."]))
        return "/" + "/".join(out)

    def realpath(self, p):
        """The real path below the root of host path p, symlinks resolved inside it."""
        r = self.resolve(p)
        return self._prefix + r if self._prefix else r

    def readlink(self, p):
        return os.readlink(self.path(p))

    # ------------------------------------------------------------ queries
    def _stat(self, p):
        try:
            return os.stat(self.realpath(p))
        except (OSError, ValueError):
            return None

    def stat(self, p):
        """os.stat of host path p (symlinks followed inside the root); raises OSError."""
        return os.stat(self.realpath(p))

    def exists(self, p):
        return self._stat(p) is not None

    def isdir(self, p):
        st = self._stat(p)
        return st is not None and stat.S_ISDIR(st.st_mode)

    def isfile(self, p):
        st = self._stat(p)
        return st is not None and stat.S_ISREG(st.st_mode)

    def ischr(self, p):
        """A character device node (what /dev/nvidia0 or /dev/kfd must be)."""
        st = self._stat(p)
        return st is not None and stat.S_ISCHR(st.st_mode)

    def islink(self, p):
        return os.path.islink(self.path(p))

    def access(self, p, mode):
        try:
            return os.access(self.realpath(p), mode)
        except (OSError, ValueError):
            return False

    def listdir(self, p):
        """Sorted names in host directory p; [] when it is missing or unreadable."""
        try:
            return sorted(os.listdir(self.realpath(p)))
        except (OSError, ValueError):
            return []

    # -------------------------------------------------------------- reads
    def read_bytes(self, p, limit=None):
        with open(self.realpath(p), "rb") as f:
            return f.read() if limit is None else f.read(limit)

    def read_text(self, p, limit=None):
        return self.read_bytes(p, limit).decode("utf-8", "surrogateescape")

    def which(self, name, dirs):
        """First host path dir/name in dirs that is an executable file, or None."""
        for d in dirs:
            if not d.startswith("/"):
                continue
            cand = d.rstrip("/") + "/" + name
            if self.isfile(cand) and self.access(cand, os.X_OK):
                return cand
        return None


class Contribution:
    """What one discovery adds to the launch plan.

    binds     [(src, dst, ro, why)]: src is a real path on this machine (already below
              the host root), dst a path in the container. Device nodes are binds whose
              dst is under /dev. Later binds with the same dst are dropped.
    env       {NAME: value} set in the container after the image's env scripts (like
              --env); e.g. the renumbered CUDA_VISIBLE_DEVICES.
    prepend   {NAME: [path, ...]} prepended (in order) to the variable in the
              container, after the env scripts: LD_LIBRARY_PATH, PATH.
    hide      [container path]: host device nodes that must NOT be visible in the
              container (GPUs outside CUDA_VISIBLE_DEVICES); the renumbered variables
              are only right when the runtime keeps them out of the container's /dev.
    warnings  [str] for stderr (one line each: what is missing and what it means).
    notes     [str] for --dry-run (what was found, what was skipped and why).
    skip_covered  True: a bind whose dst and src lie below a host directory already
              bound at its own path is left out (Lmod inside: a MODULEPATH entry in
              $HOME or /tmp, bound rw already).
    """

    __slots__ = ("binds", "env", "prepend", "hide", "warnings", "notes", "skip_covered")

    def __init__(self):
        self.binds = []
        self.env = {}
        self.prepend = {}
        self.hide = []
        self.warnings = []
        self.notes = []
        self.skip_covered = False

    def bind(self, src, dst, ro=True, why=""):
        """Add a bind unless one with the same dst is there; True when added."""
        if any(b[1] == dst for b in self.binds):
            return False
        self.binds.append((src, dst, bool(ro), why))
        return True

    def add_prepend(self, name, path):
        lst = self.prepend.setdefault(name, [])
        if path not in lst:
            lst.append(path)

    def merge(self, other):
        """Add other's parts to this one (first bind of a dst wins); returns self."""
        for b in other.binds:
            self.bind(*b)
        self.env.update(other.env)
        for k, paths in other.prepend.items():
            for p in paths:
                self.add_prepend(k, p)
        for h in other.hide:
            if h not in self.hide:
                self.hide.append(h)
        self.warnings.extend(w for w in other.warnings if w not in self.warnings)
        self.notes.extend(other.notes)
        return self

    @property
    def device_binds(self):
        return [b for b in self.binds if b[1] == "/dev" or b[1].startswith("/dev/")]

    def __bool__(self):
        return bool(self.binds or self.env or self.prepend or self.hide)

    def describe(self):
        """Lines for --dry-run."""
        out = []
        for src, dst, ro, why in self.binds:
            out.append(f"bind {src} -> {dst}{' ro' if ro else ''}  # {why}")
        for h in self.hide:
            out.append(f"hide {h}  # not a visible device")
        for k in sorted(self.env):
            out.append(f"env {k}={self.env[k]}")
        for k in sorted(self.prepend):
            out.append(f"env {k}=+{':'.join(self.prepend[k])}:...")
        out.extend(f"warning: {w}" for w in self.warnings)
        out.extend(f"note: {n}" for n in self.notes)
        return out

    def __repr__(self):
        return (f"Contribution(binds={len(self.binds)}, env={self.env}, "
                f"prepend={self.prepend}, hide={self.hide}, warnings={self.warnings})")


def choice(policy, key, allowed, default, c):
    """policy.KEY when it is one of allowed, else default (with a warning in
    Contribution c when it is set to something else)."""
    v = getattr(policy, key)
    if v is None:
        return default
    if isinstance(v, bool):             # YAML's off/on arrive as booleans
        v = {False: "off", True: "on"}[v]
    if v not in allowed:
        c.warnings.append(f"site policy {key}={v!r} is not one of "
                          f"{', '.join(allowed)}; using {default!r}")
        return default
    return v


# The gates: whether a discovery is on (force: its flag, --nv/--rocm/--ib), the cheap
# part of each discovery's entry (gpu.discover_nvidia, gpu.discover_rocm,
# ib.discover_ib), here so that hpcimage.host.discover runs them without importing
# those modules. None, with the note saying why, when it is off.

def _gpu_gate(host, policy, force, c, vendor, label, ctl, flag):
    """None when the site's gpu policy (or the absent device node ctl) turns support
    for vendor off, else whether ctl is there; force (the flag) overrides both."""
    mode = choice(policy, "gpu", GPU_MODES, "auto", c)
    present = host.ischr(ctl)
    if not force:
        if mode not in ("auto", vendor):
            c.notes.append(f"gpu={mode}: {label} support off ({flag} turns it on)")
            return None
        if not present:
            c.notes.append(f"gpu={mode}: no {ctl} on the host, {label} support off")
            return None
    return present


def nvidia_gate(host, policy, force, c):
    """None when NVIDIA support is off, else whether /dev/nvidiactl is there."""
    return _gpu_gate(host, policy, force, c, "nvidia", "NVIDIA", "/dev/nvidiactl", "--nv")


def rocm_gate(host, policy, force, c):
    """None when ROCm support is off, else whether /dev/kfd is there."""
    return _gpu_gate(host, policy, force, c, "rocm", "ROCm", "/dev/kfd", "--rocm")


def ib_gate(host, policy, force, c):
    """None when InfiniBand support is off, else the names in /dev/infiniband."""
    mode = choice(policy, "infiniband", IB_MODES, "auto", c)
    nodes = host.listdir("/dev/infiniband")
    present = any(n.startswith("uverbs") for n in nodes)
    if not force:
        if mode == "off":
            c.notes.append("infiniband=off: RDMA support off (--ib turns it on)")
            return None
        if mode == "auto" and not present:
            c.notes.append("infiniband=auto: no /dev/infiniband/uverbs* on the host, "
                           "RDMA support off")
            return None
    return nodes
