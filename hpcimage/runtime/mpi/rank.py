"""The rank side of image-mpi: the rank's plan and environment, then the shared (or a
per-rank) container, then exec. Standard library only."""
import os
import sys

from hpcimage.host.mpi import bind_contribution
from hpcimage.runtime.mpi.jobenv import FORWARD_PREFIXES, PMIX_TRANSLATE, PMIX_DIR_VARS, NO_CMA, job_key
from hpcimage.runtime.mpi.shared import join_shared


def rank_environ(environ):
    """PMIx variable translation (PMIX_{PTL_MODULE,SECURITY_MODE,GDS_MODULE} ->
    PMIX_MCA_{ptl,psec,gds} when unset), for the application's environment."""
    out = {}
    for src, dst in PMIX_TRANSLATE.items():
        if environ.get(src) and not environ.get(dst):
            out[dst] = environ[src]
    return out


def pmix_dirs(environ):
    """Host directories the PMIx/PMI server talks through; bound into the container."""
    dirs = []
    for v in PMIX_DIR_VARS:
        d = environ.get(v)
        if d and d.startswith("/") and os.path.isdir(d) and d not in dirs:
            dirs.append(d)
    return dirs


def rank_signature(rest, opts):
    """The runtime options of a rank's command line (REST: after image-mpi-rank) cut the
    way hpcimage-join cuts them (up to the first `--`), or None when that cut does not
    give the program the runtime parsed."""
    rest = list(rest)
    if "--" not in rest or any("\x1f" in a for a in rest):
        return None
    k = rest.index("--")
    if rest[k + 1:] != list(opts.args):
        return None
    return "".join(a + "\x1f" for a in rest[:k])


def wrapper_signature(rest, opts):
    """The same for the wrapper form, `srun image-mpi [OPTIONS] [--] PROGRAM` (no `--`
    needed): "image-mpi" and the words the parser took as options; hpcimage-join
    accepts a rank whose words start with exactly those and go on with PROGRAM."""
    rest = list(rest)
    n = len(rest) - len(opts.args)
    if n < 0 or rest[n:] != list(opts.args) or any("\x1f" in a for a in rest):
        return None
    return "".join(a + "\x1f" for a in ["image-mpi", *rest[:n]])


def run_rank(opts, image, site, environ, signature=None):
    """Rank side: plan, then shared (or per-rank) namespaces, then exec. signature:
    the rank's runtime options as hpcimage-join sees them (for the recipe)."""
    from hpcimage.runtime.execute import execute
    locked = environ.pop("HPCIMAGE_MPI_LOCKED_FD", None)
    os.environ.pop("HPCIMAGE_MPI_LOCKED_FD", None)
    key = job_key(environ) if environ.get("HPCIMAGE_MPI_SHARE", "1") != "0" else None
    p = rank_plan(opts, image, site, environ, shared=key is not None)
    if opts.dry_run:
        sys.stdout.write(p.describe())
        sys.stdout.write(f"# ranks share namespaces: {'yes, job ' + key if key else 'no'}\n")
        return 0
    p.warn(opts.prog, environ)
    if key is None:
        execute(p)
        return 1
    tail = join_shared(p, key, environ, signature, locked, opts.cleanenv)
    execute(tail)
    return 1


def rank_plan(opts, image, site, environ, shared=True):
    """The launch plan of one rank (the launcher makes the same one to prepare the
    node's container before the ranks start)."""
    from hpcimage.runtime import plan as launch
    env = dict(environ)
    env.update(rank_environ(environ))
    if not shared:
        for k, v in NO_CMA.items():
            env.setdefault(k, v)
    extra = [d for d in pmix_dirs(environ)]
    contributions = []
    mode = opts.mpi_mode or (site.get("mpi") or {}).get("mode") or "hybrid"
    if mode == "bind":
        contributions.append(bind_contribution(site, environ, opts.args[0] if opts.args else ""))
    return launch.plan(opts, image, site, env, extra_binds=extra,
                       keep_prefixes=FORWARD_PREFIXES, contributions=contributions)
