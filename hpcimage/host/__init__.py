"""Host discovery: what of the host (GPUs, InfiniBand, ...) enters a container.

Every host file is read through one `HostRoot`, so that tests (and a site checking a
copy of a node) can point the discovery at a fake host tree (env HPCIMAGE_HOST_ROOT,
default `/`): paths are resolved inside that root with chroot semantics (an absolute
symlink in the tree points into the tree, `..` stops at its top). Discovery functions are pure: they read, and return a
`Contribution` (binds, environment, warnings) that the runtime adds to its launch plan;
they never mount, exec or fork.

Standard library only, cheap to import: this package is on the `image-exec` hot path.
The submodules (gpu, ib, ldcache, elf) are imported only when used.
"""
import os

from hpcimage.host.root import HostRoot, Contribution, NEVER_BIND, LIBS_DIR  # noqa: F401
from hpcimage.host.root import nvidia_gate, rocm_gate, ib_gate

__all__ = ["HostRoot", "Contribution", "discover", "NEVER_BIND", "LIBS_DIR"]


def discover(policy=None, environ=None, nv=False, rocm=False, ib=False, host=None):
    """All host contributions for one launch: NVIDIA and AMD GPUs, InfiniBand.

    policy: the site's config.policy.Policy (keys in docs/gpu-ib.md; None: the defaults); environ: the caller's environment
    (CUDA_VISIBLE_DEVICES, ...); nv/rocm/ib: the --nv/--rocm/--ib flags of this call."""
    if policy is None:
        from hpcimage.config.policy import Policy
        policy = Policy()
    environ = os.environ if environ is None else environ
    host = host or HostRoot(environ=environ)
    total = Contribution()
    cache = _SharedLdCache(host)    # read once, only if some discovery needs it
    # Each discovery's gate first: one that is off gives its notes without importing
    # its module (a node without GPUs or InfiniBand pays nothing more).
    for gate, force in ((nvidia_gate, nv), (rocm_gate, rocm), (ib_gate, ib)):
        off = Contribution()
        if gate(host, policy, force, off) is None:
            total.merge(off)
            continue
        if gate is ib_gate:
            from hpcimage.host.ib import discover_ib as entry
        else:
            from hpcimage.host import gpu
            entry = gpu.discover_nvidia if gate is nvidia_gate else gpu.discover_rocm
        total.merge(entry(host, policy, environ, force=force, cache=cache))
    return total


class _SharedLdCache:
    """The host's ld.so.cache shared by the discoveries of one launch: an
    hpcimage.host.ldcache.LdCache made on first use, so that a node where every
    discovery is off (no GPU, no InfiniBand) does not even import the reader."""

    __slots__ = ("_host", "_cache")

    def __init__(self, host):
        self._host, self._cache = host, None

    def __getattr__(self, name):
        if self._cache is None:
            from hpcimage.host.ldcache import LdCache
            self._cache = LdCache(self._host)
        return getattr(self._cache, name)
