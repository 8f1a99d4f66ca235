"""Click commands for SIF files and conversions: `hpcimage sif ...` and `hpcimage build`.

`hpcimage sif header|list|info|dump` print exactly what the reference `siftool` prints
(the formats live in hpcimage.image.sif); the logic of `build` lives in hpcimage.imagebuild.convert.
"""
import sys

import click

from hpcimage.image import sif as _sif

_OBJECT_ID = click.IntRange(0, 0xFFFFFFFF)


def _write(data):
    with _stdout() as out:
        out.write(data)


class _stdout:
    """sys.stdout's bytes, flushed; a reader that went away (`| head`) ends us quietly,
    with the status a SIGPIPE death has, as siftool's would."""

    def __enter__(self):
        sys.stdout.flush()
        return sys.stdout.buffer

    def __exit__(self, kind, exc, tb):
        try:
            if kind is None:
                sys.stdout.buffer.flush()
                return False
        except BrokenPipeError:
            kind = BrokenPipeError
        if kind is not None and issubclass(kind, BrokenPipeError):
            import os
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            sys.exit(128 + 13)
        return False


@click.group("sif")
def sif():
    """Inspect SIF (Singularity Image Format) files, as siftool does."""


@sif.command("header")
@click.argument("image")
def header(image):
    """Show the global header of IMAGE."""
    _write(_sif.format_header(_sif.SifImage.open(image)))


@sif.command("list")
@click.argument("image")
def list_(image):
    """List the data objects of IMAGE."""
    _write(_sif.format_list(_sif.SifImage.open(image)))


@sif.command("info")
@click.argument("object_id", metavar="ID", type=_OBJECT_ID)
@click.argument("image")
def info(object_id, image):
    """Show the descriptor of data object ID of IMAGE."""
    _write(_sif.format_info(_sif.SifImage.open(image), object_id))


@sif.command("dump")
@click.argument("object_id", metavar="ID", type=_OBJECT_ID)
@click.argument("image")
def dump(object_id, image):
    """Write the bytes of data object ID of IMAGE to standard output."""
    img = _sif.SifImage.open(image)
    img.descriptor(object_id)
    with _stdout() as out:
        img.copy_object(object_id, out.write)


@click.command("build")
@click.option("--sandbox", "-s", is_flag=True,
              help="Build a sandbox (a directory) instead of an image file.")
@click.option("--force", "-F", is_flag=True, help="Overwrite OUT if it exists.")
@click.option("--notest", "-T", is_flag=True,
              help="Definition files: do not run the %test section.")
@click.option("--build-arg", "build_args", multiple=True, metavar="NAME=VALUE",
              help="Definition files: a value for {{ NAME }} (repeatable).")
@click.option("--warn-unused-build-args", "warn_unused", is_flag=True,
              help="A --build-arg that no stage uses is a warning, not an error.")
@click.option("--verbose", "-v", is_flag=True,
              help="Show the bootstrap agent's output (debootstrap's), not only what "
                   "the build is doing.")
@click.option("--encrypt", "-e", is_flag=True,
              help="Encrypt the SIF (gocryptfs, as Apptainer's) with the key of "
                   "APPTAINER_ENCRYPTION_PEM_PATH or APPTAINER_ENCRYPTION_PASSPHRASE.")
@click.option("--passphrase", is_flag=True,
              help="Encrypt the SIF with a passphrase asked on the terminal.")
@click.option("--pem-path", metavar="FILE", type=click.Path(dir_okay=False),
              help="Encrypt the SIF for the PKCS#1 RSA public key FILE.")
@click.option("--all", "all_", is_flag=True,
              help="Build every image of --site that has images/<Name>-<version>.def "
                   "(or images/<Name>.def) and publish it into the store; OUT/SOURCE: "
                   "none, or the modules (Name or Name/version) to build.")
@click.option("--site", "site_path", default="site.yaml", show_default=True,
              type=click.Path(dir_okay=False), help="With --all: the site description.")
@click.option("--fakeroot", "-f", "fakeroot", is_flag=True,
              help="Accepted (Apptainer's): a definition file is always built as root of "
                   "a user namespace, through /etc/subuid and /etc/subgid where you have "
                   "ranges (else your own ids only).")
@click.argument("out", required=False)
@click.argument("source", required=False)
def build(sandbox, force, notest, build_args, all_, site_path, out, source, verbose,
          warn_unused, fakeroot, encrypt, passphrase, pem_path):
    """Build OUT (.sif, .sqfs or, with --sandbox, a directory) from SOURCE.

    SOURCE is a definition file (.def, Apptainer syntax; built without root in a
    user namespace), docker://REF or oras://REF (a registry), a sandbox directory,
    a SquashFS image or a SIF image. A
    directory's /.singularity.d/Singularity and labels.json go into a SIF as its
    definition-file and labels objects. OUT is written under a temporary name and
    renamed into place: a failed build leaves nothing behind.
    """
    from hpcimage.imagebuild import buildcmd
    buildcmd.run(sandbox, force, notest, build_args, all_, site_path, out, source, verbose,
                 warn_unused, passphrase, encrypt, pem_path)
