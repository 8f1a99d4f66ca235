"""The central image store: `hpcimage publish` (administrator) and `image-update` (user).

Publish places an image at the path site.yaml gives for a name and version and records
it in the manifest of that store directory:

    STOREDIR/NAME                          the current image (0644)
    STOREDIR/hpcimage-manifest.json        the manifest (0644), rewritten atomically
    STOREDIR/.hpcimage.lock                publishers' flock (one publish at a time)
    STOREDIR/.hpcimage-previous/SHA-NAME   previous versions (site.yaml `keep`)
    STOREDIR/.NAME.hpcimage-tmp.PID        a copy in progress (removed by the next run)

    {"images": {"NAME": {"module": "Name/version",
                         "current": {"sha256", "size", "mtime_ns", "published",
                                     "build_date", "definition_sha256", "source", "file"},
                         "previous": [entries, newest first]}},
     "version": 1, "_comment": ...}

Order of a publish: copy to a temporary name (hashing while copying), fsync; hard-link
the old file into .hpcimage-previous; rename the new one into place; then rewrite the
manifest (temporary name, fsync, rename). A reader therefore sees an old or a new
image and an old or a new manifest, never half of one; between the two renames the
file does not match the manifest's size/mtime, which image-update notices and waits
out.

`image-update` copies the module's image into the user's local image directory (see
hpcimage.runtime.localcopy for the layout and for how the wrappers choose), verifying the
sha256 while it copies, under a flock beside the copy, and renames it into place.
"""
