"""`hpcimage inspect IMAGE`: what an image says about itself, without starting it.

Reads /.singularity.d (labels.json, Singularity, runscript, runscript.help, env/*.sh)
and /scif/apps of a directory, SquashFS or SIF image (SquashFS through `unsquashfs -cat`,
at the partition's offset for SIF: nothing is mounted or copied), plus the SIF object
list. Only the small metadata files are read, so the cost does not grow with the image.
"""
import json
import os

from hpcimage.image.tree import Reader
from hpcimage.errors import UsageError
from hpcimage.image import open_image

META = ".singularity.d"
FILES = {"labels": "labels.json", "deffile": "Singularity", "runscript": "runscript",
         "help": "runscript.help", "startscript": "startscript", "test": "test"}


def _text(data):
    return None if data is None else data.decode("utf-8", "replace")


def metadata(path):
    image = open_image(path, check_arch=False)   # any architecture
    rd = Reader(image)
    info = {"path": image.path, "kind": image.kind}
    if image.kind != "sandbox":
        info["size"] = os.path.getsize(image.path)
    for key, name in FILES.items():
        data = rd.cat(f"{META}/{name}")
        if key == "labels":
            try:
                info["labels"] = json.loads(data) if data else {}
            except ValueError:
                info["labels"] = {}
                info["labels_error"] = "labels.json is not valid JSON"
        else:
            info[key] = _text(data)
    env = {}
    for n in rd.listdir(f"{META}/env"):
        if n.endswith(".sh"):
            env[n] = _text(rd.cat(f"{META}/env/{n}")) or ""
    info["environment"] = env
    info["apps"] = rd.listdir("scif/apps")
    if image.kind == "sif":
        from hpcimage.image import sif
        img = sif.SifImage.open(image.path)
        listing = sif.format_list(img)
        info["sif_objects"] = listing.decode("utf-8", "replace") if isinstance(listing, bytes) else listing
    return info


def render(info):
    out = [f"Image: {info['path']} ({info['kind']}"
           + (f", {info['size']} bytes)" if "size" in info else ")")]
    out.append("Labels:")
    if info["labels"]:
        for k in sorted(info["labels"]):
            out.append(f"  {k}: {info['labels'][k]}")
    else:
        out.append("  (none)")
    if info.get("labels_error"):
        out.append(f"  warning: {info['labels_error']}")
    for key, title in (("deffile", "Definition file"), ("runscript", "Runscript"),
                       ("help", "Help"), ("startscript", "Startscript"), ("test", "Test")):
        if info.get(key):
            out.append(f"{title}:")
            out.extend("  " + ln for ln in info[key].rstrip("\n").splitlines())
    out.append("Environment:")
    if info["environment"]:
        for name, text in info["environment"].items():
            out.append(f"  {name}:")
            out.extend("    " + ln for ln in text.rstrip("\n").splitlines())
    else:
        out.append("  (none)")
    if info["apps"]:
        out.append("Apps: " + " ".join(info["apps"]))
    if "sif_objects" in info:
        out.append("SIF objects:")
        out.extend("  " + ln for ln in info["sif_objects"].rstrip("\n").splitlines())
    return "\n".join(out) + "\n"


def run(path, as_json=False):
    if not path:
        raise UsageError("inspect: no image given")
    info = metadata(path)
    if as_json:
        return json.dumps(info, indent=2, sort_keys=True) + "\n"
    return render(info)
