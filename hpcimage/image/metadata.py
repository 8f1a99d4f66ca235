"""`hpcimage inspect IMAGE`: what an image says about itself, without starting it.

Reads /.singularity.d (labels.json, Singularity, runscript, runscript.help, startscript,
test, env/*.sh) and the SCI-F apps' /scif/apps/NAME/scif of a directory, SquashFS or SIF
image (SquashFS through `unsquashfs -cat`, at the partition's offset for SIF: nothing is
mounted or copied), plus a SIF's definition-file object. Only the small metadata files are
read, so the cost does not grow with the image.

`inspect(...)` answers as `apptainer inspect` does: its selectors (-l, -d, -r, -s, -t, -e,
-H, --list-apps, --all, --app) and its JSON layout ({"data": {"attributes": {...}},
"type": "container"}, Apptainer's pkg/inspect). `metadata()` and `render()` are
hpcimage's own summary (`hpcimage inspect --summary`).
"""
import json
import os

from hpcimage.image.tree import METADATA_LIMIT, Reader
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
    if image.crypt:
        # only what is in clear: the SIF's definition file and labels objects
        info["encrypted"] = ENCRYPTED[image.crypt]
        info["deffile"] = info["deffile"] or _sif_deffile(image)
        info["labels"] = info["labels"] or _sif_labels(image)
    if image.kind == "sif":
        from hpcimage.image import sif
        img = sif.SifImage.open(image.path)
        listing = sif.format_list(img)
        info["sif_objects"] = listing.decode("utf-8", "replace") if isinstance(listing, bytes) else listing
    return info


ENCRYPTED = {"passphrase": "encrypted with a passphrase (gocryptfs)",
             "pem": "encrypted for an RSA key, PEM (gocryptfs)"}


def _sif_labels(image):
    from hpcimage.image import sif
    img = sif.SifImage.open(image.path)
    for d in img.descriptors:
        if d.data_type == sif.DATA_LABELS:
            try:
                return json.loads(img.read_object(d.id, METADATA_LIMIT))
            except ValueError:
                return {}
    return {}


def render(info):
    out = [f"Image: {info['path']} ({info['kind']}"
           + (f", {info['size']} bytes" if "size" in info else "")
           + (f", {info['encrypted']}" if info.get("encrypted") else "") + ")"]
    if info.get("encrypted"):
        out.append("  (without the key, only what the SIF holds in clear: its definition "
                   "file and labels objects)")
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
    """hpcimage's summary of IMAGE (`hpcimage inspect --summary`)."""
    if not path:
        raise UsageError("inspect: no image given")
    info = metadata(path)
    if as_json:
        return json.dumps(info, indent=2, sort_keys=True) + "\n"
    return render(info)


# ------------------------------------------------------------ as apptainer inspect

# The selectors, in the order Apptainer's text output prints them (labels last).
SECTIONS = ("deffile", "runscript", "startscript", "test", "helpfile", "environment",
            "labels")
# Apptainer's Attributes struct: the JSON keys in its field order (Go keeps it).
ATTRIBUTE_ORDER = ("apps", "environment", "labels", "runscript", "test", "helpfile",
                   "deffile", "startscript")
APP_ORDER = ("environment", "labels", "runscript", "test", "helpfile")
# section -> the file below a metadata directory (/.singularity.d or an app's scif/)
SECTION_FILES = {"labels": "labels.json", "deffile": "Singularity", "runscript": "runscript",
                 "helpfile": "runscript.help", "startscript": "startscript", "test": "test"}


def app_names(rd):
    """The SCI-F apps: /scif/apps/NAME that have a scif/ directory, as Apptainer counts
    them."""
    return [n for n in rd.listdir("scif/apps") if "scif" in rd.listdir(f"scif/apps/{n}")]


def _env_files(rd, meta, main):
    """Apptainer's environment section: env/10-docker*.sh (the image's own directory
    only) and env/9*-environment.sh, in name order."""
    names = rd.listdir(f"{meta}/env")
    found = [n for n in names if main and n.startswith("10-docker") and n.endswith(".sh")]
    found += [n for n in names if n.startswith("9") and n.endswith("-environment.sh")]
    return [f"{meta}/env/{n}" for n in found]


def _labels(data, where, warn):
    try:
        value = json.loads(data)
    except ValueError:
        warn(f"{where}: labels.json is not valid JSON")
        return {}
    if not isinstance(value, dict):
        warn(f"{where}: labels.json is not a JSON object")
        return {}
    return {str(k): v if isinstance(v, str) else json.dumps(v) for k, v in value.items()}


def _sif_deffile(image):
    """A SIF's definition-file object, or None (Apptainer reads it before the file)."""
    if image.kind != "sif":
        return None
    from hpcimage.image import sif
    img = sif.SifImage.open(image.path)
    for d in img.descriptors:
        if d.data_type == sif.DATA_DEFFILE:
            return _text(img.read_object(d.id, limit=METADATA_LIMIT))
    return None


def inspect(path, sections=(), app=None, list_apps=False, all_=False, warn=None):
    """Apptainer's inspect data of IMAGE: {"data": {"attributes": ...}, "type": "container"}.
    sections: those of SECTIONS asked for (none: labels, as Apptainer); app: the SCI-F
    app's files instead of the image's; all_: every section of the image and its apps."""
    warn = warn or (lambda msg: None)
    image = open_image(path, check_arch=False)
    rd = Reader(image)
    if image.crypt:
        warn(f"{path} is {ENCRYPTED[image.crypt]}: only the SIF's definition file and "
             "labels objects are in clear")
    if all_:
        app, sections = None, SECTIONS
    elif not sections and not list_apps:
        sections = ("labels",)
    apps = app_names(rd) if (app or list_apps or all_) else []
    if app is not None:
        if app not in apps:
            raise UsageError(f"--app {app}: no app {app!r} in {path}" + (
                f" (its apps: {', '.join(apps)})" if apps else " (it has no apps)"))
    attrs = {"apps": {}, "environment": {}, "labels": {}}
    app_attrs = {n: {"environment": {}, "labels": {}} for n in apps
                 if list_apps or all_ or n == app}
    where = [(META, attrs, True)]
    if app is not None:
        where = [(f"scif/apps/{app}/scif", app_attrs[app], False)]
    elif all_:
        where += [(f"scif/apps/{n}/scif", app_attrs[n], False) for n in apps]
    for section in sections:
        if section == "deffile":
            text = _sif_deffile(image)
            if text is None:
                for meta, _, _ in where:
                    text = _text(rd.cat(f"{meta}/Singularity"))
                    if text is not None:
                        break
            if text:
                attrs["deffile"] = text.rstrip("\n")
            continue
        for meta, into, main in where:
            if section == "startscript" and not main:
                continue
            if section == "environment":
                for f in _env_files(rd, meta, main):
                    text = _text(rd.cat(f))
                    if text is not None:
                        into["environment"]["/" + f] = text.rstrip("\n")
                continue
            data = rd.cat(f"{meta}/{SECTION_FILES[section]}")
            if data is None and section == "labels" and main and image.crypt:
                into["labels"] = _sif_labels(image)
                continue
            if data is None:
                continue
            if section == "labels":
                into["labels"] = _labels(data, "/" + meta, warn)
            elif data.rstrip(b"\n"):
                into[section] = _text(data).rstrip("\n")
    out = {}
    for key in ATTRIBUTE_ORDER:       # Go's omitempty: no empty strings or maps
        value = attrs.get(key)
        if key == "apps":
            value = {n: {k: a[k] for k in APP_ORDER if a.get(k)}
                     for n, a in sorted(app_attrs.items())}
        elif key in ("environment", "labels") and value:
            value = dict(sorted(value.items()))
        if value:
            out[key] = value
    for a in out.get("apps", {}).values():
        for k in ("environment", "labels"):
            if k in a:
                a[k] = dict(sorted(a[k].items()))
    return {"data": {"attributes": out}, "type": "container"}


def to_json(data):
    """As Go's json.MarshalIndent(v, "", "\t") writes it: tabs, UTF-8 kept, and the
    HTML characters <, > and & escaped as \u003c, \u003e, \u0026."""
    text = json.dumps(data, indent="\t", ensure_ascii=False)
    for ch, esc in (("<", "\\u003c"), (">", "\\u003e"), ("&", "\\u0026"),
                    ("\u2028", "\\u2028"), ("\u2029", "\\u2029")):
        text = text.replace(ch, esc)
    return text + "\n"


def to_text(data, app=None, list_apps=False):
    """Apptainer's text output: the app names (--list-apps), then each section found (the
    app's where the image's is empty), environment files as `=== FILE ===`, labels as
    `KEY: VALUE`, sorted."""
    attrs = data["data"]["attributes"]
    app_attrs = attrs.get("apps", {}).get(app, {}) if app else {}
    out = []
    if list_apps:
        out.extend(sorted(attrs.get("apps", {})))
    for section in SECTIONS:
        value = attrs.get(section) or app_attrs.get(section)
        if not value:
            continue
        if section == "environment":
            for k in sorted(value):
                out.append(f"=== {k} ===\n{value[k]}\n")
        elif section == "labels":
            out.extend(f"{k}: {value[k]}" for k in sorted(value))
        else:
            out.append(value)
    return "".join(line + "\n" for line in out)
