"""`hpcimage pull`: a registry image (docker://, oras://) to a SIF file, as Apptainer's
`pull`; the logic lives in hpcimage.imagebuild.pull."""
import click

from hpcimage.errors import UsageError

# Apptainer's pull options that hpcimage does not have: refused by name (exit 2).
UNSUPPORTED = {"--disable-cache": False, "--sandbox": False, "--library": True,
               "--docker-login": False, "--docker-host": True, "--authfile": True,
               "--arch-variant": True, "--allow-unsigned": False, "-U": False,
               "--nocleanup": False}


def _env(*names):
    """Apptainer's variables for an option (APPTAINER_X, then SINGULARITY_X)."""
    return [f"{p}_{n}" for n in names for p in ("APPTAINER", "SINGULARITY")]


def _refuse(ctx, param, value):
    if value:
        raise UsageError(f"{param.opts[0]} is an Apptainer option that hpcimage pull does "
                         "not support")


def _unsupported(f):
    for name, valued in UNSUPPORTED.items():
        f = click.option(name, is_flag=not valued, expose_value=False, hidden=True,
                         callback=_refuse)(f)
    return f


@click.command("pull")
@click.option("--force", "-F", is_flag=True, envvar=_env("FORCE"),
              help="Overwrite OUTPUT if it exists.")
@click.option("--arch", metavar="ARCH", envvar=_env("PULL_ARCH"),
              help="The architecture to pull (Go's name: amd64, arm64, ...; default: "
                   "this node's).")
@click.option("--name", metavar="FILE", envvar=_env("PULL_NAME"),
              help="The file to write (instead of OUTPUT).")
@click.option("--dir", "directory", metavar="DIR", envvar=_env("PULLDIR", "PULLFOLDER"),
              help="Write OUTPUT in DIR.")
@click.option("--no-https", "--nohttps", "no_https", is_flag=True,
              help="Speak plain HTTP to the registry (always so for localhost).")
@click.option("--tmpdir", metavar="DIR",
              help="Where the conversion unpacks the image (default: $HPCIMAGE_TMPDIR, "
                   "$APPTAINER_TMPDIR, $TMPDIR, /tmp).")
@_unsupported
@click.argument("args", nargs=-1, required=True, metavar="[OUTPUT] URI")
def pull(force, arch, name, directory, no_https, tmpdir, args):
    """Pull URI (docker://REF or oras://REF) into the SIF file OUTPUT (default:
    NAME_TAG.sif, as Apptainer names it). A docker:// image is converted once into the
    cache (where `hpcimage exec docker://REF` finds it too) and copied to OUTPUT, which
    is written under a temporary name and renamed into place. Shows its progress on a
    terminal, nothing otherwise."""
    import os
    if len(args) > 2:
        raise UsageError("pull: too many arguments (usage: hpcimage pull [OPTIONS] "
                         "[OUTPUT] URI)")
    if no_https:
        os.environ["HPCIMAGE_NOHTTPS"] = "1"
    if tmpdir:
        os.environ["HPCIMAGE_TMPDIR"] = tmpdir
    from hpcimage.imagebuild import pull as _pull
    out = name or (args[0] if len(args) == 2 else _pull.default_name(args[-1]))
    if directory:
        out = os.path.join(directory, out)
    _pull.pull(out, args[-1], force=force, arch=arch)
