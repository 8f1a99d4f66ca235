"""The rank side of image-mpi: the rank's plan and environment, then the shared (or a
per-rank) container, then exec. Standard library only."""
import os
import sys

from hpcimage.host.mpi import bind_contribution
from hpcimage.runtime.mpi.jobenv import FORWARD_PREFIXES, PMIX_TRANSLATE, PMIX_DIR_VARS, NO_CMA, job_key
from hpcimage.runtime.mpi.shared import join_shared
from hpcimage.runtime import steps
from hpcimage.runtime.ops import Bind
from hpcimage.runtime.steps import is_under


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


def run_rank(opts, site, environ, signature=None):
    """Rank side: request, plan, then shared (or per-rank) namespaces, then exec.
    signature: the rank's runtime options as hpcimage-join sees them (for the recipe)."""
    from hpcimage.runtime.execute import execute
    locked = environ.pop("HPCIMAGE_MPI_LOCKED_FD", None)
    os.environ.pop("HPCIMAGE_MPI_LOCKED_FD", None)
    key = job_key(environ) if environ.get("HPCIMAGE_MPI_SHARE", "1") != "0" else None
    p = rank_plan(resolve(opts, site, environ), shared=key is not None)
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


def resolve(opts, site, environ):
    """The Request of one rank (runtime.request.resolve; the image as the launcher
    names it, no hints)."""
    from hpcimage.runtime import request
    return request.resolve(opts, environ, site, explain_missing=False)


def mpi_rank(r, p):
    """A rank's step (after host_devices): the PMIx variable translations; the
    launcher's and the job's variables pass --cleanenv; --mpi-mode bind (or the site's
    mpi mode): the host's MPI library."""
    p.env_add.update(rank_environ(r.environ))
    p.keep_prefixes += FORWARD_PREFIXES
    opts = r.opts
    mode = opts.mpi_mode or r.site.mpi_setting("mode")
    if mode == "bind":
        p.contribute(bind_contribution(r.site, r.environ, opts.args[0] if opts.args else ""))


def no_cma(r, p):
    """A rank's step where ranks do not share namespaces: no cross-memory attach
    between them (NO_CMA), unless the caller chose."""
    for k, v in NO_CMA.items():
        if k not in r.environ and k not in p.env_add:
            p.env_add[k] = v


def pmix_binds(r, p):
    """A rank's step (after user_binds): the PMIx/PMI server's directories at their
    paths, unless a bind at its own path holds them already."""
    for d in pmix_dirs(r.environ):
        if not any(is_under(d, b.dst) for b in p.binds if b.src == b.dst):
            p.binds.append(Bind(d, d, False, "MPI/PMIx"))


RANK_STEPS = steps.with_steps(steps.STEPS, {steps.host_devices: (mpi_rank,),
                                            steps.user_binds: (pmix_binds,)})
RANK_STEPS_UNSHARED = steps.with_steps(RANK_STEPS, {mpi_rank: (no_cma,)})


def rank_plan(r, shared=True):
    """The launch plan of one rank (the launcher makes the same one to prepare the
    node's container before the ranks start)."""
    from hpcimage.runtime.plan import plan
    return plan(r, RANK_STEPS if shared else RANK_STEPS_UNSHARED)
