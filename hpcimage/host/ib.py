"""InfiniBand / RDMA passthrough (--ib, policy `infiniband`).

Binds /dev/infiniband (uverbs*, rdma_cm, umad*, issm*), the host's rdma-core user space
into /.singularity.d/libs (libibverbs, librdmacm, libibumad, the mlx5/mlx4/efa direct
verbs libraries, the verbs providers from the libibverbs/ directory next to
libibverbs, and what those need that is not part of glibc or the compiler runtime),
and /etc/libibverbs.d (the *.driver files naming the providers). libibverbs first
tries its compiled-in provider directory, then dlopen()s lib<name>-rdmav<N>.so by
name (rdma-core's dynamic_driver.c), which finds the host's provider on
LD_LIBRARY_PATH. Adds the site's UCX/libfabric settings (policy ib_env) and warns when
RLIMIT_MEMLOCK is too low for RDMA: it cannot be raised inside the user namespace.

Pure: reads the host through a HostRoot, returns a Contribution. Standard library only.
"""
from hpcimage.host.root import Contribution
from hpcimage.host.root import ib_gate
from hpcimage.host.gpu import LIBS_DIR, bind_libraries, str_list

from hpcimage.config.policy import valid_name  # noqa: E402
from hpcimage.config.policy import MEMLOCK_MIN  # noqa: E402
MAX_CLOSURE = 128
DEVICE_PREFIXES = ("uverbs", "rdma_cm", "umad", "issm")


def _mib(n):
    return f"{n / (1 << 20):g} MiB"


def memlock_warning(minimum=MEMLOCK_MIN, limits=None):
    """A warning when the soft RLIMIT_MEMLOCK is below minimum bytes, else None."""
    if not minimum:
        return None
    import resource
    soft, hard = limits if limits is not None else resource.getrlimit(resource.RLIMIT_MEMLOCK)
    inf = resource.RLIM_INFINITY
    if soft == inf or soft >= minimum:
        return None
    hint = ("'ulimit -l unlimited' before the launch" if hard == inf
            else f"'ulimit -l {hard // 1024}' before the launch" if hard >= minimum
            else "a higher memlock limit from the administrators (limits.conf, "
                 "Slurm PropagateResourceLimits)")
    return (f"locked-memory limit (ulimit -l) is {_mib(soft)}: RDMA needs at least "
            f"{_mib(minimum)} (ideally unlimited) to register memory and cannot raise it "
            f"inside the container; use {hint}")


def discover_ib(host, policy, environ, force=False, cache=None):
    """Contribution for InfiniBand/RDMA: on with force (--ib) or policy infiniband=on,
    or infiniband=auto (default) when /dev/infiniband/uverbs* exists."""
    c = Contribution()
    tag = "--ib" if force else "infiniband"
    nodes = ib_gate(host, policy, force, c)
    if nodes is None:
        return c
    present = any(n.startswith("uverbs") for n in nodes)
    from hpcimage.host import gpulibs as L     # past the checks: off costs no import
    if present:
        c.bind(host.realpath("/dev/infiniband"), "/dev/infiniband", False,
               f"{tag}: RDMA devices")
        known = [n for n in nodes if n.startswith(DEVICE_PREFIXES)]
        c.notes.append(f"{tag}: devices {' '.join(known)}")
        if "rdma_cm" not in nodes:
            c.notes.append(f"{tag}: no /dev/infiniband/rdma_cm (librdmacm, RoCE and "
                           "IPoIB connection set-up will not work)")
    else:
        c.warnings.append(f"{tag}: no InfiniBand/RDMA device on this host "
                          "(/dev/infiniband/uverbs* missing); binding the libraries only")

    if cache is None:
        from hpcimage.host.ldcache import LdCache
        cache = LdCache(host)
    why = f"{tag}: rdma-core"
    bound = bind_libraries(host, cache, L.IB_LIBS, c, why=why, tag=tag,
                           essential=L.IB_ESSENTIAL_LIBS,
                           extra=str_list(policy, "ib_extra_libs"))
    _providers(host, cache, c, tag, bound)
    _closure(host, cache, c, tag, bound)
    if host.isdir("/etc/libibverbs.d"):
        c.bind(host.realpath("/etc/libibverbs.d"), "/etc/libibverbs.d", True,
               f"{tag}: verbs provider configuration")
        _absolute_drivers(host, c, tag)
    elif bound:
        c.warnings.append(f"{tag}: no /etc/libibverbs.d on the host: libibverbs will "
                          "find no provider")

    env = policy.ib_env or {}
    if isinstance(env, dict):
        for k, v in env.items():
            if isinstance(k, str) and valid_name(k) and isinstance(v, (str, int)) \
                    and not isinstance(v, bool):
                c.env[k] = str(v)
            else:
                c.warnings.append(f"{tag}: site ib_env entry {k!r} ignored")
    minimum = policy.ib_memlock_min
    if not isinstance(minimum, int) or isinstance(minimum, bool):
        minimum = MEMLOCK_MIN
    w = memlock_warning(minimum)
    if w:
        c.warnings.append(f"{tag}: {w}")
    return c


def _providers(host, cache, c, tag, bound):
    """The verbs providers: <dir of libibverbs>/libibverbs/*.so, bound by file name."""
    from hpcimage.host import elf
    verbs = cache.lookup("libibverbs.so.1")
    if verbs is None:
        return
    dirs = []
    for p in (verbs, host.resolve(verbs)):
        d = p.rpartition("/")[0] + "/libibverbs"
        if d not in dirs and host.isdir(d):
            dirs.append(d)
    if not dirs:
        c.warnings.append(f"{tag}: no verbs provider directory next to {verbs} "
                          "(libibverbs/): no RDMA device will be usable")
        return
    names = []
    for d in dirs:
        for n in host.listdir(d):
            if not n.endswith(".so") or n in names:
                continue
            real = host.realpath(f"{d}/{n}")
            try:
                elf.header(real)
            except (OSError, ValueError) as e:
                c.notes.append(f"{tag}: provider {d}/{n} skipped ({e})")
                continue
            if c.bind(real, f"{LIBS_DIR}/{n}", True, f"{tag}: verbs provider"):
                bound[n] = real
                names.append(n)
    c.notes.append(f"{tag}: providers {' '.join(names) or '(none)'}")


def _closure(host, cache, c, tag, bound):
    """Add what the bound libraries need (DT_NEEDED) that glibc/the compiler runtime do
    not provide, transitively (bounded)."""
    from hpcimage.host import elf, gpulibs as L
    todo = list(bound.values())
    have = set(bound)
    done = set()
    while todo and len(done) < MAX_CLOSURE:
        real = todo.pop(0)
        if real in done:
            continue
        done.add(real)
        try:
            needed = elf.info(real).needed
        except (OSError, ValueError) as e:
            c.notes.append(f"{tag}: cannot read {real}: {e}")
            continue
        for so in needed:
            if so in have or so in L.SYSTEM_SONAMES:
                continue
            have.add(so)
            p = cache.find(so)
            if p is None:
                c.warnings.append(f"{tag}: {so} (needed by {real.rpartition('/')[2]}) not "
                                  "found in the host's ld.so.cache")
                continue
            if c.bind(p, f"{LIBS_DIR}/{so}", True, f"{tag}: needed by rdma-core"):
                bound[so] = p
                todo.append(p)


def _absolute_drivers(host, c, tag):
    """A .driver file naming a provider by absolute path (`driver /usr/lib64/libmlx4`)
    makes libibverbs open that path + -rdmav<N>.so: bind those files there."""
    for n in host.listdir("/etc/libibverbs.d"):
        if not n.endswith(".driver"):
            continue
        try:
            text = host.read_text(f"/etc/libibverbs.d/{n}", 4096)
        except OSError:
            continue
        for line in text.splitlines():
            parts = line.split()
            if len(parts) >= 2 and parts[0] == "driver" and parts[1].startswith("/"):
                d, _, base = parts[1].rpartition("/")
                for f in host.listdir(d or "/"):
                    if f.startswith(base + "-") and f.endswith(".so"):
                        c.bind(host.realpath(f"{d}/{f}"), f"{d}/{f}", True,
                               f"{tag}: provider named in {n}")
