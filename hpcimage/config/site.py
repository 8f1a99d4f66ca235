"""Reading and validating site.yaml into typed objects.

Every key a site.yaml may hold is declared once, in the schema tables below
(SITE_KEYS, IMAGE_KEYS); a later feature adds a row, a parser and, where it
needs one, a field on Site or Image.  Validation walks the composed YAML node
tree (not the constructed Python values) so that every error names the key
path and the line it comes from:

    site.yaml:7: images[1].name: must match [A-Za-z0-9][A-Za-z0-9._+-]* ...

All errors are raised as hpcimage.errors.UsageError (exit status 2).  This
module renders and launches nothing.
"""
import difflib
import os
import posixpath
import re
from dataclasses import dataclass, field
from typing import Callable, Dict, Optional, Tuple

import yaml

from hpcimage.errors import UsageError

DEFAULT_PYTHON = "/opt/hpcimage/venv/bin/python3"
from hpcimage.config import bindspec  # noqa: E402
from hpcimage.config.policy import DEFAULT_LOCAL, MPI_DEFAULTS, VERIFY_MODES  # noqa: E402
DEFAULT_KEEP = 2                         # previous versions publish keeps in the store
POLICY_VERSION = 1                       # the format of site.json; hpcimage doctor compares it

NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]*")
RESERVED_VERSIONS = ("default", "latest")
# Characters of NAME_RE that a module system cannot load in a module's name or version:
# Environment Modules 5 reads `module load A/1.0+cuda` as A/1.0 with the variant cuda
# (its advanced version specifiers; @ ~ : , = and spaces, also theirs, NAME_RE refuses).
MODULE_SYNTAX = {"+": "variant syntax in Environment Modules 5"}
BIND_MODES = ("ro", "rw")
# C0 controls and DEL: never allowed in paths, names or one-line values.
_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f]")


# --------------------------------------------------------------------------
# Typed result
# --------------------------------------------------------------------------

@dataclass(frozen=True)
class Bind:
    """One bind spec `src[:dst[:ro|rw]]`, validated; `spec` is kept verbatim."""
    spec: str
    src: str
    dst: str
    mode: str


@dataclass(frozen=True)
class Image:
    name: str
    version: str
    path: str                       # absolute path of the image file
    description: str = ""
    default: bool = False
    binds: Tuple[Bind, ...] = ()
    help: str = ""
    url: str = ""
    line: int = 0                   # line of the image's entry in site.yaml
    personal_overlay: Optional[Tuple[int, bool]] = None     # (MiB, sparse): per user
    verify: Optional[str] = None    # signature policy (None: the site's, signing.verify)

    @property
    def module(self):
        return f"{self.name}/{self.version}"


@dataclass(frozen=True)
class Site:
    path: str                       # site.yaml as the user named it (for messages)
    base_dir: str                   # absolute directory of site.yaml
    store: str                      # absolute
    modulefiles: str                # output roots as written (relative or absolute)
    tcl_modulefiles: str
    wrappers: str
    python: str
    binds: Tuple[Bind, ...] = ()
    images: Tuple[Image, ...] = field(default_factory=tuple)
    mpi: Dict[str, object] = field(default_factory=dict)
    hardware: Dict[str, object] = field(default_factory=dict)   # GPU/IB policy keys
    local: str = DEFAULT_LOCAL      # as written: ~ and $VAR are expanded by the runtime
    keep: int = DEFAULT_KEEP
    extra_wrappers: Tuple[str, ...] = ()
    lmod_in_image: bool = False     # the host's Lmod and MODULEPATH inside the images
    lmod_prefix: Optional[str] = None   # the host's Lmod (LMOD_PKG); None: found at run time
    overlay: Dict[str, object] = field(default_factory=dict)    # OVERLAY_KEYS given
    signing: Dict[str, object] = field(default_factory=dict)    # site.yaml signing:
    warm: int = 0                   # seconds a warm container stays idle (0: off; docs/warm.md)

    def roots(self, prefix=None):
        """Absolute output roots {"modulefiles", "tcl_modulefiles", "wrappers"}.

        Relative roots are relative to site.yaml's directory, or to `prefix`
        when given; with a prefix an absolute root is staged under it too
        (DESTDIR-style), so nothing is written outside the prefix.
        """
        out = {}
        for key in ("modulefiles", "tcl_modulefiles", "wrappers"):
            value = getattr(self, key)
            if prefix is None:
                base = self.base_dir
            else:
                base = os.path.abspath(prefix)
                value = value.lstrip("/") or "."
            out[key] = posixpath.normpath(posixpath.join(base, value))
        return out

    def policy(self, roots=None):
        """The runtime's policy (site.json), plain JSON-able data.

        `roots`: the absolute output roots (Site.roots()); the Lmod-inside policy names
        the Lua modulefiles root relative to the wrappers directory, where site.json
        lives, so that a rendered tree can be moved as a whole."""
        image_binds = {}
        overlays = {}
        for img in self.images:
            if img.binds:
                image_binds[img.module] = [b.spec for b in img.binds]
            if img.personal_overlay:
                size, sparse = img.personal_overlay
                overlays[img.module] = {"size": size, "sparse": sparse}
        out = {
            "binds": [b.spec for b in self.binds],
            "image_binds": image_binds,
            "local": self.local,
            "version": POLICY_VERSION,
        }
        out.update(self.hardware)
        out.update(self.overlay)
        if overlays:
            out["personal_overlays"] = overlays
        if self.mpi:
            out["mpi"] = {k: (list(b.spec for b in v) if k == "binds" else
                              list(v) if isinstance(v, tuple) else v)
                          for k, v in self.mpi.items() if v not in (None, (), "")}
        if self.signing:
            sg = self.signing
            out["verify"] = sg.get("verify") or "off"
            out["signing"] = {k: list(v) if isinstance(v, tuple) else v
                              for k, v in sg.items() if k in ("trusted", "keyring", "pem_keys")
                              and v not in (None, ())}
        image_verify = {img.module: img.verify for img in self.images if img.verify}
        if image_verify:
            out["image_verify"] = image_verify
        if self.warm:
            out["warm"] = self.warm
        if self.lmod_in_image:
            roots = roots or self.roots()
            lmod = {"modulepath": [posixpath.relpath(roots["modulefiles"], roots["wrappers"])]}
            if self.lmod_prefix:
                lmod["prefix"] = self.lmod_prefix
            out["lmod"] = lmod
        return out


# --------------------------------------------------------------------------
# Errors and node helpers
# --------------------------------------------------------------------------

class _Ctx:
    """What the parsers need: the file name for messages and a YAML constructor."""

    def __init__(self, display, base_dir, loader):
        self.display = display
        self.base_dir = base_dir
        self.loader = loader

    def error(self, node, keypath, message):
        line = node.start_mark.line + 1 if node is not None else None
        where = f"{self.display}:{line}" if line else self.display
        if keypath:
            return UsageError(f"{where}: {keypath}: {message}")
        return UsageError(f"{where}: {message}")


_KIND = {
    "tag:yaml.org,2002:str": "a string",
    "tag:yaml.org,2002:int": "an integer",
    "tag:yaml.org,2002:float": "a number",
    "tag:yaml.org,2002:bool": "a boolean",
    "tag:yaml.org,2002:null": "nothing (null)",
    "tag:yaml.org,2002:timestamp": "a date",
}


def _describe(node):
    if isinstance(node, yaml.MappingNode):
        return "a mapping"
    if isinstance(node, yaml.SequenceNode):
        return "a list"
    return _KIND.get(node.tag, f"a value tagged {node.tag}")


def _scalar(ctx, node, keypath):
    """The Python value of a scalar node (str, int, float, bool or None)."""
    if not isinstance(node, yaml.ScalarNode):
        return node  # caller reports the type
    if node.tag not in _KIND:
        raise ctx.error(node, keypath, f"unsupported YAML tag {node.tag}")
    try:
        return ctx.loader.construct_object(node, deep=True)
    except yaml.YAMLError as e:  # e.g. an invalid timestamp
        raise ctx.error(node, keypath, f"invalid value: {getattr(e, 'problem', e)}")


def _expect_str(ctx, node, keypath, what="a string"):
    if isinstance(node, yaml.ScalarNode) and node.tag == "tag:yaml.org,2002:str":
        return node.value
    raise ctx.error(node, keypath, f"expected {what}, got {_describe(node)}")


def _no_control(ctx, node, keypath, value, allow_newlines=False):
    if "\x00" in value:
        raise ctx.error(node, keypath, "must not contain NUL characters")
    if not allow_newlines and _CONTROL_RE.search(value):
        raise ctx.error(node, keypath, "must not contain control characters (newlines, tabs, ...)")
    return value


# --------------------------------------------------------------------------
# Value parsers: (ctx, node, keypath) -> value, raising ctx.error(...)
# --------------------------------------------------------------------------

def parse_name(ctx, node, keypath):
    value = _expect_str(ctx, node, keypath)
    if not NAME_RE.fullmatch(value):
        raise ctx.error(node, keypath,
                        f"invalid name {value!r}: must match {NAME_RE.pattern} "
                        "(letters, digits, '.', '_', '+', '-'; no '/', quotes, spaces or '$')")
    return value


def parse_version(ctx, node, keypath):
    # An unquoted number (12, 16.04, 1.10) is taken verbatim as written.
    if isinstance(node, yaml.ScalarNode) and node.tag in (
            "tag:yaml.org,2002:int", "tag:yaml.org,2002:float"):
        value = node.value
    else:
        value = _expect_str(ctx, node, keypath)
    if not NAME_RE.fullmatch(value):
        raise ctx.error(node, keypath,
                        f"invalid version {value!r}: must match {NAME_RE.pattern} "
                        "(letters, digits, '.', '_', '+', '-'; no '/', quotes, spaces or '$')")
    if value in RESERVED_VERSIONS:
        raise ctx.error(node, keypath, f"{value!r} is reserved by the module systems")
    return value


def parse_text(ctx, node, keypath):
    """Free text (descriptions, help): any characters but NUL; newlines allowed."""
    value = _expect_str(ctx, node, keypath)
    return _no_control(ctx, node, keypath, value, allow_newlines=True)


def parse_line(ctx, node, keypath):
    """A one-line string (URLs)."""
    value = _expect_str(ctx, node, keypath)
    return _no_control(ctx, node, keypath, value)


def parse_bool(ctx, node, keypath):
    value = _scalar(ctx, node, keypath)
    if isinstance(value, bool):
        return value
    raise ctx.error(node, keypath, f"expected true or false, got {_describe(node)}")


def _path_str(ctx, node, keypath):
    value = _expect_str(ctx, node, keypath, "a path")
    if not value:
        raise ctx.error(node, keypath, "must not be empty")
    return _no_control(ctx, node, keypath, value)


def parse_dir(ctx, node, keypath):
    """A directory, absolute or relative to site.yaml's directory -> absolute."""
    value = _path_str(ctx, node, keypath)
    return posixpath.normpath(posixpath.join(ctx.base_dir, value))


def parse_output_root(ctx, node, keypath):
    """An output root, kept as written (resolved later, against --prefix)."""
    value = _path_str(ctx, node, keypath)
    if ":" in value:
        raise ctx.error(node, keypath, "must not contain ':' (it ends up in PATH/MODULEPATH)")
    return posixpath.normpath(value)


def parse_abs_path(ctx, node, keypath):
    value = _path_str(ctx, node, keypath)
    if not value.startswith("/"):
        raise ctx.error(node, keypath, f"must be an absolute path, got {value!r}")
    return posixpath.normpath(value)


def parse_file(ctx, node, keypath):
    """An image file, relative to `store` (resolved by the image parser)."""
    return posixpath.normpath(_path_str(ctx, node, keypath))


def parse_bind(ctx, node, keypath):
    """One bind spec, Apptainer's grammar (config.bindspec): `src[:dst[:OPTIONS]]`,
    absolute paths, `\\,` and `\\:` for a literal ',' and ':'; one bind per entry."""
    spec = _expect_str(ctx, node, keypath, "a bind spec 'src[:dst[:ro|rw]]'")
    _no_control(ctx, node, keypath, spec)
    specs = bindspec.split_list(spec)
    if len(specs) != 1:
        raise ctx.error(node, keypath, f"one bind per entry, got {spec!r} (a ',' in a "
                        "path is written '\\,')")
    try:
        b = bindspec.parse(specs[0])
    except ValueError as e:
        raise ctx.error(node, keypath, str(e)) from None
    dst = b.dst or b.src
    for label, p in (("source", b.src), ("destination", dst)):
        if not p.startswith("/"):
            raise ctx.error(node, keypath,
                            f"{label} of bind {spec!r} must be an absolute path")
    return Bind(spec=spec, src=posixpath.normpath(b.src), dst=posixpath.normpath(dst),
                mode="ro" if b.ro else "rw")


def parse_local_dir(ctx, node, keypath):
    """A directory in each user's space: absolute, `~/...` or starting with a $VARIABLE;
    kept as written (expanded by the runtime, for the user running it)."""
    value = _path_str(ctx, node, keypath)
    if not (value.startswith("/") or value == "~" or value.startswith("~/")
            or value.startswith("$")):
        raise ctx.error(node, keypath, f"must be an absolute path, '~/...' or start with "
                                       f"a $VARIABLE, got {value!r}")
    if value.startswith("/"):
        return posixpath.normpath(value)
    return value.rstrip("/") or value     # ~/.. or $X/..: normpath would drop the base


def parse_count(ctx, node, keypath):
    value = _scalar(ctx, node, keypath)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ctx.error(node, keypath, f"expected a whole number, got {_describe(node)}")
    if value < 0:
        raise ctx.error(node, keypath, f"must be 0 or more, got {value}")
    return value


WARM_MAX = 86400       # a day: a warm container is for a workflow's burst of short tasks


def parse_warm(ctx, node, keypath):
    value = parse_count(ctx, node, keypath)
    if value > WARM_MAX:
        raise ctx.error(node, keypath, f"at most {WARM_MAX} seconds, got {value}")
    return value


def list_of(item_parser):
    def parse(ctx, node, keypath):
        if not isinstance(node, yaml.SequenceNode):
            raise ctx.error(node, keypath, f"expected a list, got {_describe(node)}")
        return tuple(item_parser(ctx, item, f"{keypath}[{i}]")
                     for i, item in enumerate(node.value))
    return parse


# --------------------------------------------------------------------------
# The schema tables
# --------------------------------------------------------------------------

@dataclass(frozen=True)
class Key:
    parse: Callable
    required: bool = False
    default: object = None
    doc: str = ""


def _mapping(ctx, node, keypath, schema):
    """Validate a mapping node against `schema` -> {key: value} with defaults filled."""
    if not isinstance(node, yaml.MappingNode):
        raise ctx.error(node, keypath or None, f"expected a mapping, got {_describe(node)}")
    kpath_prefix = f"{keypath}." if keypath else ""
    seen = {}
    for knode, _ in node.value:
        if knode.tag == "tag:yaml.org,2002:merge":
            continue
        if not (isinstance(knode, yaml.ScalarNode) and knode.tag == "tag:yaml.org,2002:str"):
            raise ctx.error(knode, keypath or None,
                            f"keys must be strings, got {_describe(knode)}")
        if knode.value in seen:
            raise ctx.error(knode, kpath_prefix + knode.value,
                            f"duplicate key (first at line {seen[knode.value]})")
        seen[knode.value] = knode.start_mark.line + 1
    try:
        ctx.loader.flatten_mapping(node)  # YAML merge keys (<<: *anchor); own keys win
    except yaml.MarkedYAMLError as e:
        raise ctx.error(node, keypath or None, f"invalid merge: {e.problem}")
    winners = {}
    for knode, vnode in node.value:
        if not (isinstance(knode, yaml.ScalarNode) and knode.tag == "tag:yaml.org,2002:str"):
            raise ctx.error(knode, keypath or None,
                            f"keys must be strings, got {_describe(knode)}")
        winners[knode.value] = (knode, vnode)
    values = {}
    for key, (knode, vnode) in winners.items():
        kpath = kpath_prefix + key
        if key not in schema:
            close = difflib.get_close_matches(key, list(schema), n=1)
            hint = f"did you mean '{close[0]}'? " if close else ""
            raise ctx.error(knode, kpath,
                            f"unknown key ({hint}known keys: {', '.join(schema)})")
        values[key] = schema[key].parse(ctx, vnode, kpath)
    for key, spec in schema.items():
        if key not in values:
            if spec.required:
                kpath = f"{keypath}.{key}" if keypath else key
                raise ctx.error(node, kpath, "required key is missing")
            values[key] = spec.default
    return values


PERSONAL_OVERLAY_SIZE = 1024        # MiB, personal_overlay: true
OVERLAY_MIN_SIZE = 64               # MiB, as `overlay create`


def parse_overlay_size(ctx, node, keypath):
    value = _scalar(ctx, node, keypath)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ctx.error(node, keypath, f"expected a size in MiB, got {_describe(node)}")
    if value < OVERLAY_MIN_SIZE:
        raise ctx.error(node, keypath, f"must be at least {OVERLAY_MIN_SIZE} (MiB), got {value}")
    return value


PERSONAL_OVERLAY_KEYS: Dict[str, Key] = {
    "size": Key(parse_overlay_size, default=PERSONAL_OVERLAY_SIZE,
                doc="MiB of the ext3 file (at least 64)"),
    "sparse": Key(parse_bool, default=True,
                  doc="blocks allocated on use (false: all of them at creation)"),
}


def parse_personal_overlay(ctx, node, keypath):
    """true, false, or {size: MiB, sparse: bool}: (size, sparse) or None (off)."""
    if isinstance(node, yaml.ScalarNode):
        on = parse_bool(ctx, node, keypath)
        return (PERSONAL_OVERLAY_SIZE, True) if on else None
    values = _mapping(ctx, node, keypath, PERSONAL_OVERLAY_KEYS)
    return (values["size"], values["sparse"])


IMAGE_KEYS: Dict[str, Key] = {
    "name": Key(parse_name, required=True,
                doc="module name; [A-Za-z0-9][A-Za-z0-9._+-]*"),
    "version": Key(parse_version, required=True,
                   doc="module version; same characters as name; quote it (\"16.04\")"),
    "file": Key(parse_file, required=True,
                doc="image file, relative to store or absolute"),
    "description": Key(parse_text, default="",
                       doc="free text; the first line-joined form is the whatis"),
    "default": Key(parse_bool, default=False,
                   doc="this version is what `module load <name>` loads"),
    "binds": Key(list_of(parse_bind), default=(),
                 doc="binds for this image only, added to the site's"),
    "help": Key(parse_text, default="", doc="extra text for `module help`"),
    "url": Key(parse_line, default="", doc="a web page about the image"),
    "personal_overlay": Key(parse_personal_overlay, default=None,
                            doc="each user's writable ext3 overlay for this module: true or "
                                "{size: MiB, sparse: bool}; made on first use"),
    "verify": Key(lambda c, n, k: parse_verify_mode(c, n, k), default=None,
                  doc="signature policy of this image: off|warn|require (docs/signing.md)"),
}


def choice(*choices):
    def parse(ctx, node, keypath):
        value = _expect_str(ctx, node, keypath)
        if value not in choices:
            raise ctx.error(node, keypath, f"must be one of {', '.join(choices)}, "
                                           f"not {value!r}")
        return value
    return parse


def parse_soname(ctx, node, keypath):
    value = _expect_str(ctx, node, keypath)
    if not NAME_RE.fullmatch(value):
        raise ctx.error(node, keypath, f"not a library name: {value!r}")
    return value


MPI_KEYS: Dict[str, Key] = {
    "mode": Key(choice("hybrid", "bind"), default=MPI_DEFAULTS["mode"],
                doc="default model of image-mpi (--mpi-mode overrides)"),
    "launcher": Key(choice("auto", "srun", "mpirun"), default=MPI_DEFAULTS["launcher"],
                    doc="auto: srun inside a Slurm allocation, mpirun outside"),
    "srun_mpi": Key(choice("pmix", "pmi2", "none"), default=MPI_DEFAULTS["srun_mpi"],
                    doc="srun --mpi=... added when the user gives none"),
    "implementation": Key(choice("openmpi", "mpich"), default=MPI_DEFAULTS["implementation"],
                          doc="the host MPI (found from mpirun when absent)"),
    "prefix": Key(parse_abs_path, default=MPI_DEFAULTS["prefix"],
                  doc="host MPI install prefix, bound at the same path (bind model)"),
    "libs": Key(list_of(parse_soname), default=MPI_DEFAULTS["libs"],
                doc="extra host libraries for the bind model (sonames)"),
    "binds": Key(list_of(parse_bind), default=MPI_DEFAULTS["binds"],
                 doc="extra binds for MPI jobs"),
}


def parse_raw(ctx, node, keypath):
    """Plain YAML data, checked as a whole by hpcimage.config.policy.validate_policy."""
    return ctx.loader.construct_object(node, deep=True)


# GPU and InfiniBand policy (docs/gpu-ib.md); flat keys, copied into site.json.
HARDWARE_KEYS = ("gpu", "gpu_devices", "gpu_extra_libs", "gpu_exclude_libs",
                 "gpu_extra_binaries", "gpu_extra_devices", "infiniband", "ib_env",
                 "ib_extra_libs", "ib_memlock_min")


# Overlays (docs/overlays.md); flat keys, copied into site.json where given.
OVERLAY_KEYS = ("writable_tmpfs_size", "overlay_driver")


def parse_mib(ctx, node, keypath):
    value = parse_count(ctx, node, keypath)
    if value < 1:
        raise ctx.error(node, keypath, "must be 1 (MiB) or more")
    return value
def parse_verify_mode(ctx, node, keypath):
    """off|warn|require; YAML 1.1 reads a bare `off` as false: that is "off" too."""
    if getattr(node, "tag", "") == "tag:yaml.org,2002:bool" and node.value.lower() in ("off", "no", "false"):
        return "off"
    return choice(*VERIFY_MODES)(ctx, node, keypath)


def parse_fingerprint(ctx, node, keypath):
    """An OpenPGP fingerprint (40 hex digits, spaces allowed: upper-cased) or a DSSE key
    ID (SHA256:base64, as `hpcimage verify --key` prints it)."""
    value = _expect_str(ctx, node, keypath)
    if value.startswith("SHA256:") and re.fullmatch(r"SHA256:[A-Za-z0-9+/]{43}", value):
        return value
    fp = value.replace(" ", "").upper()
    if not re.fullmatch(r"[0-9A-F]{40}", fp):
        raise ctx.error(node, keypath, f"not an OpenPGP fingerprint (40 hex digits) or a "
                                       f"DSSE key ID (SHA256:...): {value!r}")
    return fp


SIGNING_KEYS: Dict[str, Key] = {
    "verify": Key(parse_verify_mode, default="off",
                  doc="every image's signature policy: off|warn|require"),
    "trusted": Key(list_of(parse_fingerprint), default=(),
                   doc="signers trusted: OpenPGP fingerprints, DSSE key IDs"),
    "keyring": Key(parse_abs_path, default=None,
                   doc="OpenPGP public keyring to verify with (default: the global ones)"),
    "pem_keys": Key(list_of(parse_abs_path), default=(),
                    doc="PEM public keys to verify DSSE signatures with"),
    "sign_key": Key(parse_abs_path, default=None,
                    doc="what `hpcimage publish --sign` signs with: a PEM private key "
                        "(DSSE) or an OpenPGP secret keyring (its first key)"),
}


def parse_signing(ctx, node, keypath):
    return _mapping(ctx, node, keypath, SIGNING_KEYS)


def parse_mpi(ctx, node, keypath):
    return _mapping(ctx, node, keypath, MPI_KEYS)


def parse_image(ctx, node, keypath):
    values = _mapping(ctx, node, keypath, IMAGE_KEYS)
    values["line"] = node.start_mark.line + 1
    return values


SITE_KEYS: Dict[str, Key] = {
    "store": Key(parse_dir, required=True,
                 doc="central image store; relative to site.yaml's directory"),
    "modulefiles": Key(parse_output_root, default="modulefiles",
                       doc="Lua modulefile root (Lmod)"),
    "tcl_modulefiles": Key(parse_output_root, default="modulefiles-tcl",
                           doc="Tcl modulefile root (Environment Modules 5)"),
    "wrappers": Key(parse_output_root, default="wrappers",
                    doc="image-* wrappers and site.json"),
    "python": Key(parse_abs_path, default=DEFAULT_PYTHON,
                  doc="interpreter the wrappers exec"),
    "binds": Key(list_of(parse_bind), default=(),
                 doc="binds for every image"),
    "images": Key(list_of(parse_image), required=True,
                  doc="the images, one module each"),
    **{k: Key(parse_raw, default=None, doc="GPU/InfiniBand policy: docs/gpu-ib.md")
       for k in HARDWARE_KEYS},
    "mpi": Key(parse_mpi, default=None,
               doc="the host MPI for image-mpi (see docs/site-yaml.md)"),
    "signing": Key(parse_signing, default=None,
                   doc="signature policy and keys (docs/signing.md)"),
    "local": Key(parse_local_dir, default=DEFAULT_LOCAL,
                 doc="each user's local image directory (image-update); ~ and $VAR at run time"),
    "keep": Key(parse_count, default=DEFAULT_KEEP,
                doc="previous versions of an image `hpcimage publish` keeps in the store"),
    "extra_wrappers": Key(list_of(choice("image-inspect")), default=(),
                          doc="optional wrappers to render too (image-inspect)"),
    "lmod_in_image": Key(parse_bool, default=False,
                         doc="the host's Lmod and MODULEPATH inside the images (`module` works there)"),
    "lmod_prefix": Key(parse_abs_path, default=None,
                       doc="the host's Lmod (holding libexec/lmod and init/); default: found "
                           "at run time from $LMOD_PKG, $LMOD_DIR, $LMOD_CMD, else /usr/share/lmod/lmod"),
    "warm": Key(parse_warm, default=0,
                doc="seconds image-exec's container stays standing idle for the next call "
                    "of the same user, image and options to join (0: off; docs/warm.md)"),
    "writable_tmpfs_size": Key(parse_mib, default=None,
                               doc="--writable-tmpfs's size in MiB (default 64, as Apptainer's)"),
    "overlay_driver": Key(choice("auto", "kernel", "fuse-overlayfs"), default=None,
                          doc="overlays: the kernel's overlayfs where it can (auto), or "
                              "always one of them"),
}


# --------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------

def load(path="site.yaml"):
    """Read and validate `path` -> Site; raises UsageError (exit 2) on bad input."""
    display = str(path)
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise UsageError(f"{display}: cannot read: {e.strerror}")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        raise UsageError(f"{display}:{line}: not valid UTF-8")
    return loads(text, display=display,
                 base_dir=os.path.dirname(os.path.abspath(path)))


def loads(text, display="site.yaml", base_dir=None):
    """Validate site.yaml text; `base_dir` anchors relative paths (default: cwd)."""
    base_dir = os.path.abspath(base_dir or os.getcwd())
    loader = yaml.SafeLoader(text)
    try:
        try:
            root = loader.get_single_node()
        except yaml.MarkedYAMLError as e:
            mark = e.problem_mark or e.context_mark
            line = f":{mark.line + 1}" if mark else ""
            what = e.problem or e.context or "syntax error"
            if e.context and e.problem and not e.context.startswith("while "):
                what = f"{e.context}, {e.problem}"   # "expected a single document..., but found..."
            raise UsageError(f"{display}{line}: invalid YAML: {what}") from None
        except yaml.YAMLError as e:
            raise UsageError(f"{display}: invalid YAML: {e}") from None
        ctx = _Ctx(display, base_dir, loader)
        if root is None or (isinstance(root, yaml.ScalarNode)
                            and root.tag == "tag:yaml.org,2002:null"):
            raise UsageError(f"{display}:1: empty file: expected a mapping with "
                             "'store' and 'images'")
        values = _mapping(ctx, root, "", SITE_KEYS)
        return _build(ctx, root, values)
    finally:
        loader.dispose()


def _build(ctx, root, values):
    images = []
    first = {}            # (name, version) -> line
    defaults = {}         # name -> (version, line)
    image_nodes = _list_items(root, "images")
    for i, (raw, inode) in enumerate(zip(values["images"], image_nodes)):
        keypath = f"images[{i}]"
        ident = (raw["name"], raw["version"])
        if ident in first:
            raise ctx.error(inode, keypath,
                            f"duplicate image {raw['name']}/{raw['version']} "
                            f"(first at line {first[ident]})")
        first[ident] = raw["line"]
        _loadable(ctx, inode, keypath, raw["name"], raw["version"])
        if raw["default"]:
            if raw["name"] in defaults:
                other, line = defaults[raw["name"]]
                raise ctx.error(_key_node(inode, "default") or inode, f"{keypath}.default",
                                f"{raw['name']} already has a default version "
                                f"({other}, line {line})")
            defaults[raw["name"]] = (raw["version"], raw["line"])
        images.append(Image(
            name=raw["name"], version=raw["version"],
            path=posixpath.normpath(posixpath.join(values["store"], raw["file"])),
            description=raw["description"], default=raw["default"],
            binds=raw["binds"], help=raw["help"], url=raw["url"], line=raw["line"],
            personal_overlay=raw["personal_overlay"],
            verify=raw["verify"]))

    roots = {k: values[k] for k in ("modulefiles", "tcl_modulefiles", "wrappers")}
    keys = list(roots)
    for a in keys:
        for b in keys:
            if a >= b:
                continue
            pa = posixpath.normpath(posixpath.join(ctx.base_dir, roots[a]))
            pb = posixpath.normpath(posixpath.join(ctx.base_dir, roots[b]))
            if _nested(pa, pb):
                later = b if _key_node(root, b) is not None else a
                other = a if later == b else b
                raise ctx.error(_key_node(root, later) or root, later,
                                f"must not be the same as, inside or around {other} "
                                f"({roots[later]!r} vs {roots[other]!r}): each output "
                                "root holds only its own files")
    hardware = {k: values[k] for k in HARDWARE_KEYS if values.get(k) is not None}
    if hardware:
        from hpcimage.config.policy import validate_policy
        for problem in validate_policy(hardware):
            key, _, msg = problem.partition(": ")
            key = key if key in hardware else next(iter(hardware))
            raise ctx.error(_key_node(root, key) or root, key, msg or problem)
    if values["lmod_prefix"] is not None and not values["lmod_in_image"]:
        raise ctx.error(_key_node(root, "lmod_prefix") or root, "lmod_prefix",
                        "has no effect without 'lmod_in_image: true'")
    return Site(
        path=ctx.display, base_dir=ctx.base_dir, store=values["store"],
        modulefiles=roots["modulefiles"], tcl_modulefiles=roots["tcl_modulefiles"],
        wrappers=roots["wrappers"], python=values["python"], binds=values["binds"],
        images=tuple(images), mpi=dict(values["mpi"] or {}), hardware=hardware,
        local=values["local"], keep=values["keep"],
        extra_wrappers=tuple(values["extra_wrappers"]),
        lmod_in_image=values["lmod_in_image"], lmod_prefix=values["lmod_prefix"],
        overlay={k: values[k] for k in OVERLAY_KEYS if values.get(k) is not None},
        signing=dict(values["signing"] or {}),
        warm=values["warm"])


def _loadable(ctx, inode, keypath, name, version):
    """A module Lmod and Environment Modules can both load by `module load NAME/VERSION`."""
    for key, value in (("name", name), ("version", version)):
        for ch, why in MODULE_SYNTAX.items():
            if ch in value:
                raise ctx.error(
                    _key_node(inode, key) or inode, f"{keypath}.{key}",
                    f"image {name}/{version}: {ch!r} in a module's {key} is {why} "
                    f"('module load {name}/{version}' would not find it there); use "
                    "'-', '_' or '.' instead")


def _nested(a, b):
    return a == b or a.startswith(b.rstrip("/") + "/") or b.startswith(a.rstrip("/") + "/")


def _key_node(mapping, key) -> Optional[yaml.Node]:
    """The value node of `key` in a mapping node, or None."""
    if isinstance(mapping, yaml.MappingNode):
        for k, v in mapping.value:
            if isinstance(k, yaml.ScalarNode) and k.value == key:
                return v
    return None


def _list_items(mapping, key):
    node = _key_node(mapping, key)
    return list(node.value) if isinstance(node, yaml.SequenceNode) else []
