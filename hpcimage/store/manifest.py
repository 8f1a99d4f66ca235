"""The store's manifest (hpcimage-manifest.json): reading, writing it atomically, and
the facts of an image recorded in it."""
import hashlib
import json
import os

from hpcimage import fsutil
from hpcimage.errors import HpcimageError, UsageError
from hpcimage.store.layout import MANIFEST, TMP_MARK, now_iso


MANIFEST_VERSION = 1


HEADER = ("written by hpcimage publish -- do not edit; "
          "'hpcimage publish IMAGE --name N --version V' updates it")


def empty_manifest():
    return {"_comment": HEADER, "images": {}, "version": MANIFEST_VERSION}


def load_manifest(directory):
    """The manifest of `directory` (an empty one when it has none)."""
    path = os.path.join(directory, MANIFEST)
    try:
        with open(path, "rb") as f:
            data = json.loads(f.read().decode("utf-8"))
    except FileNotFoundError:
        return empty_manifest()
    except (OSError, ValueError) as e:
        why = e.strerror if isinstance(e, OSError) else f"not valid JSON ({e})"
        raise HpcimageError(f"cannot read the manifest {path}: {why}") from None
    if not isinstance(data, dict) or not isinstance(data.get("images"), dict):
        raise HpcimageError(f"{path}: not an hpcimage manifest")
    return data


def write_json_atomic(path, data, mode=0o644):
    """Temporary name in the same directory, fsync, rename; then fsync the directory."""
    d, name = os.path.split(path)
    tmp = os.path.join(d, f".{name}{TMP_MARK}{os.getpid()}")
    text = json.dumps(data, indent=2, sort_keys=True) + "\n"
    try:
        fsutil.write_atomic(path, text, mode, tmp=tmp)
    except OSError as e:
        raise HpcimageError(f"cannot write {path}: {e.strerror}") from None


def image_facts(path, definition=None):
    """{"build_date", "definition_sha256"} of the image at `path`.

    build_date: when the image file was made, ISO 8601 UTC ("2024-11-27T09:12:00Z"):
    the SIF header's creation time, else the SquashFS superblock's (mksquashfs's time);
    None when the file records none. (The org.label-schema.build-date label is free
    text -- Apptainer writes "Friday_14_June_2019_16:49:57_PDT", local time and a zone
    abbreviation -- and stays in the image as it is.) definition_sha256: of
    `definition` when given, else of the image's /.singularity.d/Singularity, else None."""
    from hpcimage.image import open_image
    image = open_image(path, check_arch=False)   # publish any architecture
    deffile = None
    try:
        from hpcimage.image.tree import Reader
        deffile = Reader(image).cat(".singularity.d/Singularity")
    except (OSError, HpcimageError):
        pass
    created = 0
    try:
        if image.kind == "sif":
            from hpcimage.image import sif
            created = sif.SifImage.open(path).header.created_at
        if created <= 0 and image.kind in ("sif", "squashfs"):   # Go's zero time is < 0
            with open(path, "rb") as f:
                f.seek(image.offset + 8)
                created = int.from_bytes(f.read(4), "little")
    except (OSError, ValueError, HpcimageError):
        created = 0
    build_date = now_iso(created) if created > 0 else None
    if definition is not None:
        try:
            with open(definition, "rb") as f:
                deffile = f.read()
        except OSError as e:
            raise UsageError(f"--definition {definition}: cannot read: {e.strerror}") from None
    return {"build_date": build_date,
            "definition_sha256": hashlib.sha256(deffile).hexdigest() if deffile else None}
