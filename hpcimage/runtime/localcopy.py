"""The user's local copy of a module's image: which file the wrappers start.

`image-update` (hpcimage.store) copies a module's image from the central store into
the user's local image directory, verifies its sha256 against the store manifest and
records what it verified beside the copy. The wrappers then start the local copy when
it is current and the store's file otherwise:

    local.choose(image, site, environ) -> path to start

Current means: the local copy is a regular file (not a symbolic link) whose size,
mtime and inode are those recorded by `image-update`, and the recorded sha256 is the
one the store manifest names as current. That costs a few stat()s, one readlink()
(the record) and one read of the small manifest: the image is never read or hashed
here. When the store cannot be reached (its directory missing or unreadable), a
complete local copy is used as it is. Standard library only (hot path); no json,
no re.

Layout (DIR is the local image directory: HPCIMAGE_LOCAL, else site.json's
"local", else ~/.hpcimage/images; `~` and $VAR are expanded here, at run time):

    DIR/NAME                         the copy (NAME: the store file's name)
    DIR/.NAME.hpcimage-state         the record: a symbolic link whose target is
                                     "hpcimage-state-v1 SHA256 SIZE MTIME_NS INO SOURCE"
    DIR/.NAME.hpcimage-lock          image-update's flock
    DIR/.NAME.hpcimage-tmp.PID       a copy in progress (removed by the next run)

    DIR/overlay-Name-version.img     the user's personal overlay of module Name/version
                                     (site.yaml personal_overlay; made on first use)

    STOREDIR/hpcimage-manifest.json  the manifest of the store directory holding NAME
"""
import os

from hpcimage.config.policy import DEFAULT_LOCAL  # noqa: F401

MANIFEST = "hpcimage-manifest.json"
STATE_MAGIC = "hpcimage-state-v1"
_S_IFMT = 0o170000
_S_IFREG = 0o100000


def expand(raw, environ):
    """`~`, `~/...`, `$VAR` and `${VAR}` expanded from environ; None when a variable
    is unset or empty, or the result is not an absolute path."""
    if not raw:
        return None
    if raw == "~" or raw.startswith("~/"):
        home = environ.get("HOME")
        if not home:
            import pwd
            try:
                home = pwd.getpwuid(os.getuid()).pw_dir
            except KeyError:
                return None
        raw = (home.rstrip("/") + raw[1:]) or "/"
    if "$" in raw:
        out = []
        i = 0
        n = len(raw)
        while i < n:
            c = raw[i]
            if c != "$":
                out.append(c)
                i += 1
                continue
            if raw.startswith("${", i):
                end = raw.find("}", i + 2)
                if end < 0:
                    return None
                name = raw[i + 2:end]
                i = end + 1
            else:
                j = i + 1
                while j < n and (raw[j] == "_" or raw[j].isalnum()) and raw[j].isascii():
                    j += 1
                name = raw[i + 1:j]
                i = j
            value = environ.get(name) if name else None
            if not value:
                return None
            out.append(value)
        raw = "".join(out)
    if not raw.startswith("/"):
        return None
    return os.path.normpath(raw)


def local_dir(site, environ):
    """The local image directory, or None when it cannot be resolved."""
    raw = environ.get("HPCIMAGE_LOCAL") or site.local or DEFAULT_LOCAL
    return expand(raw, environ) if isinstance(raw, str) else None


def personal_overlay(module, directory):
    """The personal overlay file of module Name/version in the local directory."""
    return os.path.join(directory, "overlay-" + module.replace("/", "-") + ".img")


def paths(image, directory):
    """(copy, state, lock, tmp prefix) of `image` in the local `directory`."""
    name = image.rstrip("/").rpartition("/")[2]
    base = os.path.join(directory, name)
    hidden = os.path.join(directory, "." + name)
    return base, hidden + ".hpcimage-state", hidden + ".hpcimage-lock", hidden + ".hpcimage-tmp."


def read_state(state_path):
    """The record beside a copy: {sha256, size, mtime_ns, ino, source} or None."""
    try:
        text = os.readlink(state_path)
    except OSError:
        return None
    parts = text.split(" ", 5)
    if len(parts) != 6 or parts[0] != STATE_MAGIC:
        return None
    try:
        return {"sha256": parts[1], "size": int(parts[2]), "mtime_ns": int(parts[3]),
                "ino": int(parts[4]), "source": parts[5]}
    except ValueError:
        return None


def format_state(sha256, st, source):
    return f"{STATE_MAGIC} {sha256} {st.st_size} {st.st_mtime_ns} {st.st_ino} {source}"


def matches(st, state):
    """True when the stat result `st` is the file `state` recorded."""
    return (st.st_mode & _S_IFMT == _S_IFREG and st.st_size == state["size"]
            and st.st_mtime_ns == state["mtime_ns"] and st.st_ino == state["ino"])


def manifest_path(image):
    return os.path.join(os.path.dirname(os.path.abspath(image)), MANIFEST)


class Unreachable(Exception):
    """The store directory (or its manifest) cannot be read."""

    def __init__(self, path, strerror):
        super().__init__(f"{path}: {strerror}")
        self.path = path
        self.strerror = strerror


def read_manifest(image):
    """The manifest of the store directory holding `image` -> dict, or None when the
    directory has none; Unreachable when the directory or the manifest cannot be read;
    ValueError when it is not a manifest."""
    from hpcimage.config.policy import loads
    path = manifest_path(image)
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        store = os.path.dirname(path)
        try:
            os.stat(store)
        except OSError as e:
            raise Unreachable(store, e.strerror) from None
        return None
    except OSError as e:
        raise Unreachable(path, e.strerror) from None
    value = loads(data.decode("utf-8", "replace"))
    if not isinstance(value, dict) or not isinstance(value.get("images"), dict):
        raise ValueError(f"{path}: not an hpcimage manifest")
    return value


def current_entry(manifest, image):
    """The manifest's current entry for `image` (a dict with sha256, size, ...) or None."""
    if not manifest:
        return None
    name = image.rstrip("/").rpartition("/")[2]
    rec = manifest["images"].get(name)
    cur = rec.get("current") if isinstance(rec, dict) else None
    return cur if isinstance(cur, dict) and isinstance(cur.get("sha256"), str) else None


def choose(image, site, environ):
    """The path the wrappers start for `image` (HPCIMAGE_IMAGE): the local copy when
    it is current, else `image` itself. Never raises for a missing or odd local copy."""
    if not image:
        return image
    directory = local_dir(site, environ)
    if directory is None:
        return image
    copy, state_path, _, _ = paths(image, directory)
    try:
        st = os.lstat(copy)
    except OSError:
        return image
    state = read_state(state_path)
    if state is None or not matches(st, state):
        return image              # absent, a symlink, changed or half-recorded
    try:
        entry = current_entry(read_manifest(image), image)
    except Unreachable:
        # The store is gone or unreadable: a complete copy is better than nothing.
        return copy
    except ValueError:
        entry = None
    if entry is not None:
        return copy if entry["sha256"] == state["sha256"] else image
    # No word from a manifest: the store's file, if it is there.
    try:
        os.stat(image)
    except OSError:
        return copy
    return image


# ---------------------------------------------------------------- the signature policy
#
# site.json "verify"/"image_verify" (site.yaml signing.verify, an image's verify:):
# off, warn or require. The wrappers never read the image for it: `hpcimage publish`
# records in the manifest entry whether the file it published is signed by a key the
# site trusts ("signature": {"verified", "signers", "reason"}), bound to its sha256,
# size and mtime; `image-update` verifies the copy it installs and records the answer
# beside it (DIR/.NAME.hpcimage-trust: a symbolic link whose target is
# "hpcimage-trust-v1 SHA256 yes|no REASON"), bound to the copy's sha256 in its state.

TRUST_MAGIC = "hpcimage-trust-v1"


def trust_path(state_path):
    return state_path[:-len(".hpcimage-state")] + ".hpcimage-trust"


def format_trust(sha256, verified, reason):
    return f"{TRUST_MAGIC} {sha256} {'yes' if verified else 'no'} {reason or '-'}"


def verify_mode(site, module):
    """The signature policy of MODULE: off, warn or require."""
    mode = site.image_verify.get(module or "") if site.image_verify else None
    return mode or site.verify or "off"


def signature_problem(image, chosen, module, site, environ):
    """(mode, message) when the file the wrapper starts (CHOSEN: IMAGE, the store's
    file, or the user's local copy of it) is not recorded as signed by a key the site
    trusts and the module's policy is warn or require; None otherwise. A few stat()s
    and readlink()s and the small manifest: the image itself is never read."""
    mode = verify_mode(site, module)
    if mode == "off" or not image:
        return None
    why = None
    if chosen != image:                     # the local copy: image-update's record
        directory = local_dir(site, environ)
        _, state_path, _, _ = paths(image, directory) if directory else (0, "", 0, 0)
        state = read_state(state_path) if directory else None
        try:
            parts = os.readlink(trust_path(state_path)).split(" ", 3) if directory else []
        except OSError:
            parts = []
        if state is None or len(parts) != 4 or parts[0] != TRUST_MAGIC \
                or parts[1] != state["sha256"]:
            why = "its local copy was not verified by image-update (run image-update)"
        elif parts[2] != "yes":
            why = parts[3]
    else:
        try:
            entry = current_entry(read_manifest(image), image)
        except (Unreachable, ValueError):
            entry = None
        rec = entry.get("signature") if entry else None
        if not isinstance(rec, dict):
            why = "no signature record in the store's manifest (publish it again)"
        elif rec.get("verified") is not True:
            why = str(rec.get("reason") or "not verified")
        else:
            try:
                st = os.stat(image)
                same = st.st_size == entry.get("size") and st.st_mtime_ns == entry.get("mtime_ns")
            except OSError:
                same = False
            if not same:
                why = "the store's file is not the one published and verified"
    if why is None:
        return None
    return mode, (f"{module or image}: image not signed by a key the site trusts: {why} "
                  f"(site policy verify: {mode})")
