"""The site's policy on the hot path: site.json (compiled by `hpcimage generate`), read
with the standard library only."""
import os

from hpcimage.errors import HpcimageError, UsageError


def site_config(environ):
    """The path of the site's policy: HPCIMAGE_SITE_CONFIG, which a wrapper sets to the
    site.json beside it; a wrapper reached through a symbolic link sets HPCIMAGE_WRAPPER
    (its path) instead, and site.json is beside the link's target. The resolved path
    replaces HPCIMAGE_WRAPPER in environ (what the launcher passes on: MPI ranks, the
    lmod_in_image discovery). None: no site (`hpcimage exec` without the wrappers)."""
    wrapper = environ.pop("HPCIMAGE_WRAPPER", None)
    if wrapper:
        if environ is not os.environ:
            os.environ.pop("HPCIMAGE_WRAPPER", None)
        path = os.path.join(os.path.dirname(os.path.realpath(wrapper)), "site.json")
        environ["HPCIMAGE_SITE_CONFIG"] = path
        return path
    return environ.get("HPCIMAGE_SITE_CONFIG") or None


# The hardware keys of the policy (GPU, InfiniBand): their values, checked by
# `hpcimage generate` (site validation); the runtime itself is lenient (an unknown value
# gives a warning and the default: hpcimage.host).
GPU_MODES = ("auto", "nvidia", "rocm", "off")
DEVICE_MODES = ("visible", "all")
IB_MODES = ("auto", "on", "off")
VERIFY_MODES = ("off", "warn", "require")


# The keys of site.json, each with its type, its default (the value when the key is
# absent) and its meaning: the one place the runtime's defaults live. site.json is
# written by `hpcimage generate` (config.site.Site.policy); a key missing here is an
# error (Policy.from_json). The runtime is lenient about values (an unknown GPU or IB
# mode gives a warning and the default: hpcimage.host); `hpcimage generate` checks them
# (validate_policy).
MEMLOCK_MIN = 64 << 20      # ib_memlock_min's default: 64 MiB
DEFAULT_LOCAL = "~/.hpcimage/images"
POLICY_KEYS = (
    # key                  type        default      meaning
    ("version",            "int",      None,        "site.json's format (hpcimage doctor compares it)"),
    ("binds",              "[str]",    (),          "bind specs src[:dst[:ro|rw]] for every image"),
    ("image_binds",        "{str: [str]}", {},      "bind specs of one module (Name/version)"),
    ("local",              "str",      DEFAULT_LOCAL, "image-update's local copies; ~ and $VAR "
                                                    "expanded at run time"),
    ("gpu",                "str",      "auto",      "GPU passthrough: " + "|".join(GPU_MODES)),
    ("gpu_devices",        "str",      "visible",   "GPU devices: " + "|".join(DEVICE_MODES)),
    ("gpu_extra_libs",     "[str]",    (),          "more host GPU libraries"),
    ("gpu_exclude_libs",   "[str]",    (),          "host GPU libraries left out"),
    ("gpu_extra_binaries", "[str]",    (),          "more host GPU tools"),
    ("gpu_extra_devices",  "[str]",    (),          "more device files (under /dev/)"),
    ("infiniband",         "str",      "auto",      "InfiniBand passthrough: " + "|".join(IB_MODES)),
    ("ib_env",             "{str: str}", {},        "UCX/libfabric variables set with InfiniBand"),
    ("ib_extra_libs",      "[str]",    (),          "more host RDMA libraries"),
    ("ib_memlock_min",     "int",      MEMLOCK_MIN, "locked-memory limit below which --ib warns "
                                                    "(0: no check)"),
    ("mpi",                "{str: ...}", {},        "the host MPI for image-mpi (site.yaml mpi: "
                                                    "mode, launcher, srun_mpi, implementation, "
                                                    "prefix, libs, binds)"),
    ("writable_tmpfs_size", "int",     64,          "--writable-tmpfs's size in MiB (Apptainer's "
                                                    "sessiondir max size)"),
    ("overlay_driver",     "str",      "auto",      "overlays: auto (the kernel's overlayfs where it "
                                                    "can, else fuse-overlayfs), kernel, "
                                                    "fuse-overlayfs"),
    ("personal_overlays",  "{str: {...}}", {},      "each user's overlay file per module "
                                                    "(site.yaml personal_overlay): size "
                                                    "(MiB), sparse; made on first use"),
    ("verify",             "str",      "off",       "signature policy of every image: "
                                                    "off|warn|require (docs/signing.md)"),
    ("image_verify",       "{str: str}", {},        "the signature policy of one module (Name/version)"),
    ("signing",            "{str: ...}", {},        "what image-update verifies with: trusted, "
                                                    "keyring, pem_keys (site.yaml signing:)"),
    ("warm",               "int",      0,           "seconds image-exec's container stays standing "
                                                    "idle for the next call to join (0: off)"),
    ("lmod",               "LmodInImage", None,     "Lmod inside the images (site.yaml "
                                                    "lmod_in_image): modulepath, prefix; None: off"),
)
IGNORED_KEYS = ("_comment",)    # generate's header

# site.json "mpi" (site.yaml mpi:, validated by config.site.MPI_KEYS, which takes its
# defaults from here): what image-mpi and its ranks assume for a key that is absent.
MPI_DEFAULTS = {"mode": "hybrid", "launcher": "auto", "srun_mpi": None,
                "implementation": None, "prefix": None, "libs": (), "binds": ()}


class LmodInImage:
    """site.json "lmod" (site.yaml lmod_in_image), typed: prefix (the host's Lmod tree,
    site.yaml lmod_prefix; None: found from $LMOD_PKG, $LMOD_DIR, $LMOD_CMD or the
    default), modulepath (tuple of directories; relative ones are relative to
    site.json's directory). LmodInImage.from_json: unknown key -> UsageError (exit 2)."""
    __slots__ = ("prefix", "modulepath")
    KEYS = {"prefix": None, "modulepath": ()}     # key -> default

    def __init__(self, prefix=None, modulepath=()):
        self.prefix = prefix or None
        self.modulepath = tuple(modulepath or ())

    @classmethod
    def from_json(cls, data, where="site configuration"):
        if isinstance(data, LmodInImage) or data is None:
            return data
        if not isinstance(data, dict):
            raise UsageError(f"{where}: \"lmod\" must be an object, not {type(data).__name__}")
        for key in data:
            if key not in cls.KEYS:
                raise UsageError(f"{where}: unknown key 'lmod.{key}' (site.json is written "
                                 "by 'hpcimage generate': run this hpcimage's)")
        return cls(**data)

    def __eq__(self, other):
        return (type(other) is LmodInImage and self.prefix == other.prefix
                and self.modulepath == other.modulepath)

    __hash__ = None

    def __repr__(self):
        return f"LmodInImage(prefix={self.prefix!r}, modulepath={self.modulepath!r})"


class Policy:
    """The site's policy (site.json), one attribute per key of POLICY_KEYS; Policy()
    is the empty policy (no site.json: every default)."""
    __slots__ = tuple(k for k, _t, _d, _m in POLICY_KEYS)

    def __init__(self, **values):
        for key, _t, default, _m in POLICY_KEYS:
            if key in values:
                value = values.pop(key)
            else:
                value = dict(default) if type(default) is dict else default
            object.__setattr__(self, key, value)
        self.lmod = LmodInImage.from_json(self.lmod)
        if values:
            raise TypeError(f"Policy: unknown key {next(iter(values))!r}")

    @classmethod
    def from_json(cls, data, where="site configuration"):
        """The Policy of site.json's object `data`; a key it does not know is an error
        (exit 2): site.json is generated, so it comes from another hpcimage."""
        for key in data:
            if key not in Policy.__slots__ and key not in IGNORED_KEYS:
                raise UsageError(f"{where}: unknown key {key!r} (site.json is written by "
                                 "'hpcimage generate': run this hpcimage's)")
        return cls(**{k: v for k, v in data.items() if k not in IGNORED_KEYS})

    def __eq__(self, other):
        return type(other) is Policy and all(
            getattr(self, k) == getattr(other, k) for k in Policy.__slots__)

    __hash__ = None

    def mpi_setting(self, key):
        """site.json mpi.KEY, else its default (MPI_DEFAULTS; KeyError for a key that
        is none of MPI_DEFAULTS's)."""
        value = (self.mpi or {}).get(key)
        return MPI_DEFAULTS[key] if value is None or value == "" else value

    def __repr__(self):
        return "Policy(" + ", ".join(f"{k}={getattr(self, k)!r}" for k in Policy.__slots__) + ")"


def load_policy(environ):
    """The Policy `hpcimage generate` compiled next to the wrappers (site.json); the
    defaults without one (HPCIMAGE_SITE_CONFIG unset). Errors: load_site's, and a key
    Policy does not know (exit 2)."""
    path = site_config(environ)
    if not path:
        return Policy()
    return Policy.from_json(read_site(path), path)


def load_site(environ):
    """site.json as plain data (hpcimage doctor compares it with what site.yaml
    renders); {} without one (HPCIMAGE_SITE_CONFIG unset)."""
    path = site_config(environ)
    return read_site(path) if path else {}


def read_site(path):
    """The JSON object in `path`. A site.json named but missing is an error (exit 2):
    running with an empty policy would drop the site's binds."""
    try:
        with open(path) as f:
            text = f.read()
    except FileNotFoundError:
        raise UsageError(f"site configuration {path} not found (the wrappers' site.json, "
                         "written by 'hpcimage generate'; HPCIMAGE_SITE_CONFIG names "
                         "another)") from None
    except OSError as e:
        raise HpcimageError(f"{path}: unreadable site configuration: {e.strerror}") from None
    try:
        data = loads(text)
    except ValueError as e:
        raise HpcimageError(f"{path}: unreadable site configuration: {e}") from None
    if not isinstance(data, dict):
        raise HpcimageError(f"{path}: unreadable site configuration: not a JSON object")
    return data


class _JsonContext:
    strict = True
    object_hook = object_pairs_hook = parse_constant = None
    parse_float = float
    parse_int = int
    memo = {}


def loads(text):
    """json.loads through the C scanner alone: the json package's Python front-end
    imports re and enum, 6 ms on every image-exec call. Falls back to json."""
    try:
        import _json
    except ImportError:       # not CPython
        import json
        return json.loads(text)
    text = text.strip()
    try:
        value, end = _json.make_scanner(_JsonContext)(text, 0)
        if end == len(text):
            return value
    except Exception:
        pass
    import json               # invalid: let json say exactly what is wrong
    return json.loads(text)


def validate_policy(policy):
    """Problems in the GPU/IB keys of a site policy, as 'key: message' strings."""
    return _gpu_problems(policy) + _ib_problems(policy)


def _gpu_problems(policy):
    errors = []
    for key, allowed in (("gpu", GPU_MODES), ("gpu_devices", DEVICE_MODES)):
        if key in policy:
            v = policy[key]
            if v is False:
                v = "off"
            if v not in allowed:
                errors.append(f"{key}: must be one of {', '.join(allowed)}, not {v!r}")
    for key in ("gpu_extra_libs", "gpu_extra_binaries", "gpu_extra_devices",
                "gpu_exclude_libs"):
        if key in policy:
            v = policy[key]
            if not isinstance(v, (list, tuple)) or not all(isinstance(x, str) and x for x in v):
                errors.append(f"{key}: must be a list of non-empty strings")
    for x in policy.get("gpu_extra_devices") or ():
        if isinstance(x, str) and not x.startswith("/dev/"):
            errors.append(f"gpu_extra_devices: {x!r} is not under /dev/")
    return errors


def _ib_problems(policy):
    errors = []
    if "infiniband" in policy:
        v = policy["infiniband"]
        v = {False: "off", True: "on"}.get(v, v) if isinstance(v, bool) else v
        if v not in IB_MODES:
            errors.append(f"infiniband: must be one of {', '.join(IB_MODES)}, not {v!r}")
    env = policy.get("ib_env")
    if env is not None:
        if not isinstance(env, dict):
            errors.append("ib_env: must be a mapping NAME: value")
        else:
            for k, v in env.items():
                if not isinstance(k, str) or not valid_name(k):
                    errors.append(f"ib_env: {k!r} is not a variable name")
                elif not isinstance(v, (str, int)) or isinstance(v, bool):
                    errors.append(f"ib_env: {k}: value must be a string")
    if "ib_extra_libs" in policy:
        v = policy["ib_extra_libs"]
        if not isinstance(v, (list, tuple)) or not all(isinstance(x, str) and x for x in v):
            errors.append("ib_extra_libs: must be a list of non-empty strings")
    if "ib_memlock_min" in policy:
        v = policy["ib_memlock_min"]
        if not isinstance(v, int) or isinstance(v, bool) or v < 0:
            errors.append("ib_memlock_min: must be a number of bytes (0: no check)")
    return errors


def valid_name(k):
    """An environment variable name: [A-Za-z_][A-Za-z0-9_]*."""
    return bool(k) and k.isascii() and (k[0] == "_" or k[0].isalpha()) and all(
        ch == "_" or ch.isalnum() for ch in k)
