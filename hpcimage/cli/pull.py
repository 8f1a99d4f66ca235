"""`hpcimage pull`: a registry image (docker://, oras://) to a SIF file, as Apptainer's
`pull`; the logic lives in hpcimage.imagebuild.pull."""
import click


@click.command("pull")
@click.option("--force", "-F", is_flag=True, help="Overwrite OUTPUT if it exists.")
@click.option("--arch", metavar="ARCH",
              help="The architecture to pull (Go's name: amd64, arm64, ...; default: "
                   "this node's).")
@click.option("--no-https", "no_https", is_flag=True,
              help="Speak plain HTTP to the registry (always so for localhost).")
@click.argument("args", nargs=-1, required=True, metavar="[OUTPUT] URI")
def pull(force, arch, no_https, args):
    """Pull URI (docker://REF or oras://REF) into the SIF file OUTPUT (default:
    NAME_TAG.sif). A docker:// image is converted once into the cache (as
    `hpcimage exec docker://REF` uses it) and copied to OUTPUT, written under a
    temporary name and renamed into place. Shows progress on a terminal."""
    from hpcimage.errors import UsageError
    if len(args) > 2:
        raise UsageError(f"pull: too many arguments (usage: hpcimage pull [OPTIONS] "
                         f"[OUTPUT] URI)")
    if no_https:
        import os
        os.environ["HPCIMAGE_NOHTTPS"] = "1"
    from hpcimage.imagebuild import pull as _pull
    _pull.pull(args[0] if len(args) == 2 else None, args[-1], force=force, arch=arch)
