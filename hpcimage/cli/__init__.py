"""The `hpcimage` command's front door (`hpcimage.cli:main`, also `python -m hpcimage.cli`).

The commands are click commands (hpcimage.cli.commands). The runtime verbs `exec`, `run`,
`shell` and `test` skip click's import (~25 ms on a small VM): they are the hot path and hand
their whole command line to the runtime's own parser anyway. Errors look the same on
both paths: `hpcimage: error: MESSAGE` and the error's exit status.
"""
import sys

RUNTIME_VERBS = ("exec", "run", "shell", "test")


def main(argv=None):
    args = sys.argv[1:] if argv is None else list(argv)
    verb = args[0] if args else None
    if verb in RUNTIME_VERBS:
        from hpcimage.runtime.main import main as runtime_main
        if any("://" in a for a in args):      # docker://, oras://: the slow path
            args = _from_registry(verb, args)
        runtime_main([verb, *args[1:]])
        return
    if verb in ("instance", "image-instance") and args[1:2] in (["start"], ["run"]) \
            and args[2:3] not in (["-h"], ["--help"]):
        _instance_start(verb, args)     # a service's start-up: without click either
        return
    from hpcimage.cli.commands import main as click_main
    click_main(args)


def _instance_start(verb, args):
    """`hpcimage instance start|run ...` and `image-instance start|run ...`: the
    runtime's parser takes their options (as exec's), so click adds nothing but ~25 ms."""
    from hpcimage.errors import HpcimageError
    from hpcimage.runtime.instance import start
    prog = "image-instance" if verb == "image-instance" else "hpcimage"
    try:
        sys.exit(start.start(args[1], args[2:], wrapper=verb == "image-instance"))
    except HpcimageError as e:
        sys.stderr.write(f"{prog}: error: {e.message}\n")
        sys.exit(e.status)
    except KeyboardInterrupt:
        sys.exit(130)


def _from_registry(verb, args):
    """`exec|run|shell|test [OPTIONS] docker://REF ...`: REF converted once into the cache
    (hpcimage.imagebuild.pull), then the cached SIF started as any image. ARGS as they
    are when the image is no URI (a URI among the command's own words) or when the
    options do not parse (the runtime then says why)."""
    from hpcimage.errors import HpcimageError
    from hpcimage.runtime import options
    try:
        opts = options.parse(args)
    except HpcimageError:
        return args
    image = opts.image or ""
    if image.startswith("instance://"):
        return args
    i = len(args) - len(opts.args) - 1
    if "://" not in image or opts.args == ["--help"] or i < 1 or args[i] != image:
        return args
    try:
        from hpcimage.imagebuild.pull import cached_sif
        return [*args[:i], cached_sif(image), *args[i + 1:]]
    except HpcimageError as e:
        sys.stderr.write(f"hpcimage: error: {e.message}\n")
        sys.exit(e.status)
    except KeyboardInterrupt:
        sys.exit(130)
