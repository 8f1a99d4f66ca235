"""`hpcimage overlay create`: Apptainer's command (the logic: hpcimage.image.overlayfile)."""
import click


@click.group("overlay")
def overlay():
    """Overlay files: writable layers over a read-only image (docs/fakeroot.md)."""


@overlay.command("create")
@click.option("--size", "-s", default="64", show_default=True, metavar="MiB",
              help="Size of the ext3 file system in MiB (at least 64).")
@click.option("--sparse", "-S", is_flag=True, help="A sparse file: blocks are allocated on use.")
@click.option("--create-dir", "dirs", multiple=True, metavar="DIR",
              help="Create DIR below upper/ (/opt/x: upper/opt/x; repeatable).")
@click.option("--fakeroot", "-f", is_flag=True,
              help="upper/ and work/ owned by root, for use with --fakeroot.")
@click.argument("file")
def create(size, sparse, dirs, fakeroot, file):
    """Make FILE an ext3 overlay image (upper/ and work/ inside, mkfs.ext3 -d), or add
    an ext3 overlay partition to the SIF image FILE (not a signed or encrypted one)."""
    from hpcimage.image import overlayfile
    overlayfile.create(file, size, sparse, dirs, fakeroot)
