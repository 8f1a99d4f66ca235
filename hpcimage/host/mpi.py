"""The MPI bind model: the host's MPI library, its dependency closure and component
directories, bound into the image (image-mpi --mpi-mode bind). Standard library only."""
import os

from hpcimage.errors import HpcimageError, UsageError
# Never bound from the host: the image's own C runtime must stay consistent.
from hpcimage.host.root import NEVER_BIND, LIBS_DIR  # noqa: F401  (libc & friends)


# The MPI ABI families, by the soname an application links against.
ABI = {"libmpi.so.40": "openmpi", "libmpi.so.12": "mpich", "libmpich.so.12": "mpich"}
HOST_MPI_SONAMES = {"openmpi": ("libmpi.so.40",), "mpich": ("libmpich.so.12", "libmpi.so.12")}


def _program_mpi_sonames(program, environ):
    """The MPI sonames the program links against, read from its ELF (when the program
    is a host path that the container sees at the same path, e.g. ./solver in cwd)."""
    from hpcimage.host import elf
    path = program if "/" in program else None
    if path is None or not os.path.isfile(path):
        return []
    try:
        needed = elf.info(path).needed
    except (OSError, ValueError):
        return []
    return [n for n in needed if n in ABI]


def bind_contribution(site, environ, program):
    """The bind model: the host MPI library, its dependency closure and its component
    directories, bound into the image; refuses an ABI mismatch with the program."""
    from hpcimage import host as hostmod
    from hpcimage.host import elf
    from hpcimage.host.ldcache import LdCache
    policy = site.mpi or {}
    hr = hostmod.HostRoot(environ=environ)
    cache = LdCache(hr)
    impl = policy.get("implementation") or ("openmpi" if any(k.startswith("OMPI_") for k in environ)
                                            else None)
    order = [impl] if impl else ["openmpi", "mpich"]
    found = None
    for fam in order:
        for soname in HOST_MPI_SONAMES[fam]:
            path = cache.find(soname)
            if path:
                found = (fam, soname, path)
                break
        if found:
            break
    if found is None:
        raise HpcimageError("--mpi-mode bind: no host MPI library found "
                            f"({', '.join(n for f in order for n in HOST_MPI_SONAMES[f])} "
                            "not in the host's ld.so.cache); load the host MPI or set mpi.prefix")
    fam, soname, path = found
    for want in _program_mpi_sonames(program, environ):
        if ABI[want] != fam:
            raise UsageError(f"{program} is linked against {want} "
                             f"({ABI[want]} ABI) but the host MPI is {soname} ({fam} ABI): "
                             "the bind model needs the same MPI ABI; use --mpi-mode hybrid "
                             "or build the program against the host's MPI family")
    c = hostmod.Contribution()
    # Component (plugin) directories and help/config files, at their host paths.
    libdir = os.path.dirname(path)
    dirs = [policy.get("prefix")] if policy.get("prefix") else []
    dirs += [os.path.join(libdir, d) for d in ("openmpi", "pmix2", "pmix", "mpich")]
    dirs += ["/usr/share/openmpi", "/usr/share/pmix", "/etc/openmpi", "/etc/pmix"]
    plugins = []
    for d in dirs:
        if d and hr.isdir(d):
            c.bind(hr.path(d), d, True, f"host MPI ({fam}) components")
            for top, _sub, files in os.walk(hr.path(d)):
                plugins += [os.path.join(top, f) for f in files if f.endswith(".so")]
    # The library, what it needs, and what its components need, by soname.
    todo, seen = [(soname, path)], set()

    def needs(lib):
        try:
            for n in elf.info(lib).needed:
                if n not in seen and not n.startswith(NEVER_BIND):
                    q = cache.find(n)
                    if q:
                        todo.append((n, q))
                    elif n not in missing:
                        missing.append(n)
        except (OSError, ValueError):
            pass
    missing = []
    for plugin in plugins:
        needs(plugin)
    while todo:
        name, lib = todo.pop()
        if name in seen or name.startswith(NEVER_BIND):
            continue
        seen.add(name)
        c.bind(lib, f"{LIBS_DIR}/{name}", True, f"host MPI ({fam}) for the bind model")
        needs(lib)
    if missing:
        c.notes.append("host MPI dependencies not in ld.so.cache: " + ", ".join(missing))
    c.add_prepend("LD_LIBRARY_PATH", LIBS_DIR)
    return c
