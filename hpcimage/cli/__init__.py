"""The `hpcimage` command's front door (`hpcimage.cli:main`, also `python -m hpcimage.cli`).

The commands are click commands (hpcimage.cli.commands). Two kinds of call skip click's
import (~25 ms on a small VM): the runtime verbs `exec`, `run` and `shell`, which hand
their whole command line to the runtime's own parser anyway, and the common form of
`build` (hpcimage.imagebuild.buildcmd.fast_parse; anything else goes to click). Errors look the
same on both paths: `hpcimage: error: MESSAGE` and the error's exit status.
"""
import os
import sys

RUNTIME_VERBS = ("exec", "run", "shell")


def main(argv=None):
    args = sys.argv[1:] if argv is None else list(argv)
    verb = args[0] if args else None
    if verb in RUNTIME_VERBS:
        from hpcimage.runtime.main import main as runtime_main
        runtime_main([verb, *args[1:]])
        return
    if verb == "build":
        from hpcimage.imagebuild import buildcmd
        kw = buildcmd.fast_parse(args[1:])
        if kw is not None:
            from hpcimage.errors import HpcimageError
            try:
                buildcmd.run(**kw)
            except HpcimageError as e:
                sys.stderr.write(f"hpcimage: error: {e.message}\n")
                sys.exit(e.status)
            except KeyboardInterrupt:
                sys.stderr.write("\nhpcimage: aborted\n")
                sys.exit(130)
            if argv is None:    # the program itself, not a caller in the same process
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(0)     # done, nothing left to finalize: skip ~4 ms of tear-down
            sys.exit(0)
    from hpcimage.cli.commands import main as click_main
    click_main(args)

