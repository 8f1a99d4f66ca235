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


def load_site(environ):
    """The policy `hpcimage generate` compiled next to the wrappers (site.json); {}
    without one (HPCIMAGE_SITE_CONFIG unset). A site.json named but missing is an
    error (exit 2): running with an empty policy would drop the site's binds."""
    path = site_config(environ)
    if not path:
        return {}
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


# The hardware keys of the policy (GPU, InfiniBand): their values, checked by
# `hpcimage generate` (site validation); the runtime itself is lenient (an unknown value
# gives a warning and the default: hpcimage.host).
GPU_MODES = ("auto", "nvidia", "rocm", "off")
DEVICE_MODES = ("visible", "all")
IB_MODES = ("auto", "on", "off")


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
