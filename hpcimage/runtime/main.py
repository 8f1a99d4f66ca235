"""Entry of the runtime: argv -> options -> plan -> execute. Standard library only."""
import os
import sys

from hpcimage.errors import HpcimageError
from hpcimage.linux import procstate  # first: it records the caller's signal state
from hpcimage.config.policy import load_policy


def run(argv, environ=None):
    from hpcimage.runtime import options, plan as launch, request
    from hpcimage.runtime.execute import execute
    environ = os.environ if environ is None else environ
    if argv and argv[0] == "image-mpi":
        from hpcimage.runtime.mpi import launcher as mpi
        return mpi.main(argv, environ, load_policy(environ))
    opts = options.parse(argv, environ)
    if opts.args == ["--help"] and argv[0] != "image-mpi-rank":
        sys.stdout.write(options.usage(opts))
        return 0
    if argv[0] == "image-mpi-rank":
        from hpcimage.runtime.mpi import rank
        return rank.run_rank(opts, load_policy(environ), environ,
                             rank.rank_signature(argv[1:], opts))
    if opts.image.startswith("instance://"):
        from hpcimage.runtime.instance.join import join
        return join(opts, argv, environ)
    r = request.resolve(opts, environ)
    p = launch.plan(r)
    warm = None
    if r.site.warm and opts.prog == "image-exec":     # site.yaml warm: docs/warm.md
        from hpcimage.runtime import warm
    if opts.dry_run:
        sys.stdout.write(p.describe())
        if warm:
            sys.stdout.write(warm.describe(r, p, environ, r.site))
        return 0
    sys.stdout.flush()
    sys.stderr.flush()
    p.warn(opts.prog, environ)
    if warm:
        secs = warm.seconds(r.site, environ)
        if secs and warm.why_cold(r, p, environ) is None:
            tail = warm.launch(r, p, environ, warm.signature(argv, opts), secs)
            if tail is not None:
                execute(tail)
                return 1
    execute(p)
    return 1


def main(argv=None):
    procstate.caller_environ()          # before anything reads os.environ
    argv = sys.argv[1:] if argv is None else argv
    prog = argv[0] if argv and argv[0].startswith("image-") else "hpcimage"
    if prog == "image-mpi-rank":
        prog = "image-mpi"
    try:
        sys.exit(run(argv))
    except HpcimageError as e:
        sys.stderr.write(f"{prog}: error: {e.message}\n")
        sys.exit(e.status)
    except KeyboardInterrupt:
        sys.exit(130)
