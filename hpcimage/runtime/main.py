"""Entry of the runtime: argv -> options -> plan -> execute. Standard library only."""
import os
import sys

from hpcimage.errors import HpcimageError
from hpcimage.linux import procstate  # first: it records the caller's signal state
from hpcimage.config.policy import load_site


def run(argv, environ=None):
    from hpcimage.runtime import options, plan as launch
    from hpcimage.runtime.execute import execute
    from hpcimage.image import open_image
    environ = os.environ if environ is None else environ
    if argv and argv[0] == "image-mpi":
        from hpcimage.runtime.mpi import launcher as mpi
        return mpi.main(argv, environ, load_site(environ))
    opts = options.parse(argv, environ)
    if opts.args == ["--help"] and argv[0] != "image-mpi-rank":
        sys.stdout.write(options.usage(opts))
        return 0
    site = load_site(environ)
    if opts.image and argv[0] in options.WRAPPER_VERBS:
        # HPCIMAGE_IMAGE: the user's local copy when it is current (image-update).
        from hpcimage.runtime import localcopy as local
        opts.image = local.choose(opts.image, site, environ)
    if argv[0] == "image-mpi-rank":
        from hpcimage.runtime.mpi import rank
        opts.prog = "image-mpi"
        return rank.run_rank(opts, open_image(opts.image), site, environ,
                             rank.rank_signature(argv[1:], opts))
    image = _open_image(opts, environ)
    p = launch.plan(opts, image, site, environ)
    if opts.dry_run:
        sys.stdout.write(p.describe())
        return 0
    sys.stdout.flush()
    sys.stderr.flush()
    p.warn(opts.prog, environ)
    execute(p)
    return 1


def _open_image(opts, environ):
    """open_image, saying what the user can do about a missing image."""
    from hpcimage.image import open_image
    from hpcimage.runtime.command import IMAGE_SUFFIXES
    if os.path.lexists(opts.image):
        return open_image(opts.image)
    if opts.prog.startswith("image-"):
        module = environ.get("HPCIMAGE_MODULE")
        raise HpcimageError(f"{opts.image}: image not found (the image of "
                            f"{'module ' + module if module else 'HPCIMAGE_IMAGE'} is "
                            "missing on this node)", 2)
    hint = ""
    if "/" not in opts.image and not opts.image.endswith(IMAGE_SUFFIXES):
        what = "COMMAND [ARGS...]" if opts.verb == "exec" else "[ARGS...]"
        hint = f" (the image comes first: {opts.prog} [OPTIONS] IMAGE {what}"
        if environ.get("HPCIMAGE_IMAGE"):
            hint += f"; the loaded module's image: image-{opts.verb} {what}"
        hint += ")"
    raise HpcimageError(f"{opts.image}: image not found{hint}", 2)


def main(argv=None):
    procstate.caller_environ()          # before anything reads os.environ
    argv = sys.argv[1:] if argv is None else argv
    prog = argv[0] if argv and argv[0].startswith("image-") else "hpcimage"
    if prog == "image-mpi-rank":
        prog = "image-mpi"
    try:
        sys.exit(run(argv))
    except HpcimageError as e:
        msg = e.message
        verb = argv[0] if argv else ""
        for p in (verb + ": ", f"hpcimage {verb}: ", "image-mpi: "):
            if msg.startswith(p):
                msg = msg[len(p):]
        sys.stderr.write(f"{prog}: error: {msg}\n")
        sys.exit(e.status)
    except KeyboardInterrupt:
        sys.exit(130)
