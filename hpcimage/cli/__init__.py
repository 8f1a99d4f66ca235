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
        runtime_main([verb, *args[1:]])
        return
    from hpcimage.cli.commands import main as click_main
    click_main(args)
