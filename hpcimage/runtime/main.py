"""Entry of the runtime: argv -> options -> plan -> execute. Standard library only."""
import os
import sys

from hpcimage.errors import HpcimageError, UsageError
from hpcimage.runtime import procstate  # first: it records the caller's signal state


def site_config(environ):
    """The path of the site's policy: HPCIMAGE_SITE_CONFIG, which a wrapper sets to the
    site.json beside it; a wrapper reached through a symbolic link sets HPCIMAGE_WRAPPER
    (its path) instead, and site.json is beside the link's target. The resolved path
    replaces HPCIMAGE_WRAPPER in environ (what the launcher passes on: MPI ranks, the
    lmod_in_image discovery). None: no site (`hpcimage exec` without the wrappers)."""
    wrapper = environ.pop("HPCIMAGE_WRAPPER", None)
    if wrapper:
        if environ is not os.environ:
            os.environ.pop("HPCIMAGE_WRAPPER", None)
        path = os.path.join(os.path.dirname(os.path.realpath(wrapper)), "site.json")
        environ["HPCIMAGE_SITE_CONFIG"] = path
        return path
    return environ.get("HPCIMAGE_SITE_CONFIG") or None


def load_site(environ):
    """The policy `hpcimage generate` compiled next to the wrappers (site.json); {}
    without one (HPCIMAGE_SITE_CONFIG unset). A site.json named but missing is an
    error (exit 2): running with an empty policy would drop the site's binds."""
    path = site_config(environ)
    if not path:
        return {}
    try:
        with open(path) as f:
            text = f.read()
    except FileNotFoundError:
        raise UsageError(f"site configuration {path} not found (the wrappers' site.json, "
                         "written by 'hpcimage generate'; HPCIMAGE_SITE_CONFIG names "
                         "another)") from None
    except OSError as e:
        raise HpcimageError(f"{path}: unreadable site configuration: {e.strerror}") from None
    try:
        data = loads(text)
    except ValueError as e:
        raise HpcimageError(f"{path}: unreadable site configuration: {e}") from None
    if not isinstance(data, dict):
        raise HpcimageError(f"{path}: unreadable site configuration: not a JSON object")
    return data


class _JsonContext:
    strict = True
    object_hook = object_pairs_hook = parse_constant = None
    parse_float = float
    parse_int = int
    memo = {}


def loads(text):
    """json.loads through the C scanner alone: the json package's Python front-end
    imports re and enum, 6 ms on every image-exec call. Falls back to json."""
    try:
        import _json
    except ImportError:       # not CPython
        import json
        return json.loads(text)
    text = text.strip()
    try:
        value, end = _json.make_scanner(_JsonContext)(text, 0)
        if end == len(text):
            return value
    except Exception:
        pass
    import json               # invalid: let json say exactly what is wrong
    return json.loads(text)


def run(argv, environ=None):
    from hpcimage.runtime import options, launch
    from hpcimage.image import open_image
    environ = os.environ if environ is None else environ
    if argv and argv[0] == "image-mpi":
        from hpcimage.runtime import mpi
        return mpi.main(argv, environ, load_site(environ))
    opts = options.parse(argv, environ)
    if opts.args == ["--help"] and argv[0] != "image-mpi-rank":
        sys.stdout.write(options.usage(opts))
        return 0
    site = load_site(environ)
    if opts.image and argv[0] in options.WRAPPER_VERBS:
        # HPCIMAGE_IMAGE: the user's local copy when it is current (image-update).
        from hpcimage.runtime import local
        opts.image = local.choose(opts.image, site, environ)
    if argv[0] == "image-mpi-rank":
        from hpcimage.runtime import mpi
        opts.prog = "image-mpi"
        return mpi.run_rank(opts, open_image(opts.image), site, environ,
                            mpi.rank_signature(argv[1:], opts))
    image = open_image(opts.image)
    p = launch.plan(opts, image, site, environ)
    if opts.dry_run:
        sys.stdout.write(p.describe())
        return 0
    sys.stdout.flush()
    sys.stderr.flush()
    p.warn(opts.prog, environ)
    launch.execute(p)
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
        msg = e.message
        verb = argv[0] if argv else ""
        for p in (verb + ": ", f"hpcimage {verb}: ", "image-mpi: "):
            if msg.startswith(p):
                msg = msg[len(p):]
        sys.stderr.write(f"{prog}: error: {msg}\n")
        sys.exit(e.status)
    except KeyboardInterrupt:
        sys.exit(130)
