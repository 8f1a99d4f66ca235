"""The request: everything a launch needs from the caller and the machine, resolved
once (`resolve`): the user (uid, gid, name, home, gecos, shell, group), the current
directory, the host environment, the session directory, the site's policy, the
options and the opened image. `plan(request)` reads these and nothing else of the
caller's state (a step only probes the host where it must: does a bind source exist).
A test builds one by hand. Standard library only: the hot path."""
import os

from hpcimage.config.policy import Policy, load_policy
from hpcimage.errors import HpcimageError


SESSION_DIRS = ("/var/lib/hpcimage/mnt", "/mnt", "/srv", "/media", "/opt")


class Request:
    """uid, gid, user, home (HOME, else the passwd entry's), gecos, shell, group;
    cwd: the current directory, or None when it was deleted (cwd_gone: its name then);
    environ: the host environment (a dict of its own); session_dir: where the session
    mounts go; site: the site's policy (config.policy.Policy: site.json, the defaults
    without one); opts:
    runtime.options.Options; image: the opened image.Image; home_src: -H's source (the
    container's home is then -H's destination), else None; overlays: the overlay
    layers (image.overlay.Layer: a SIF's own overlay partition, opts.overlays,
    --writable-tmpfs), bottom first, the writable one last; [] for none."""
    __slots__ = ("uid", "gid", "user", "home", "gecos", "shell", "group", "cwd",
                 "cwd_gone", "environ", "session_dir", "site", "opts", "image", "home_src",
                 "overlays")

    def __init__(self, opts, image, environ, session_dir, site=None, uid=0, gid=0,
                 user="root", home="/", gecos="", shell="/bin/sh", group=None,
                 cwd="/", cwd_gone=None, home_src=None, overlays=()):
        self.opts, self.image, self.environ = opts, image, dict(environ)
        self.session_dir, self.site = session_dir, Policy() if site is None else site
        self.uid, self.gid, self.user, self.home = uid, gid, user, home
        self.gecos, self.shell = gecos, shell
        self.group = user if group is None else group
        self.cwd, self.cwd_gone = cwd, cwd_gone
        self.home_src = home_src
        self.overlays = list(overlays)


def resolve(opts, environ, site=None, explain_missing=True):
    """The Request of options opts (runtime.options.parse) in environ: the site's policy
    (site.json, unless site is given), the image (a wrapper's: the user's local copy
    when it is current, image-update) opened once, the user, the directories. opts is
    not changed (but for opts.overlays, which gains the module's personal overlay,
    site.json personal_overlays): the image chosen is request.image (its path:
    request.image.path).
    explain_missing: a missing image's error says what the user can do about it."""
    if site is None:
        site = load_policy(environ)
    path = opts.image
    if path and opts.prog.startswith("image-"):
        # HPCIMAGE_IMAGE: the user's local copy when it is current (image-update).
        from hpcimage.runtime import localcopy as local
        path = local.choose(path, site, environ)
    image = _open_image(path, opts, environ) if explain_missing else _open(path)
    cwd, gone = _cwd()
    personal = None
    if opts.prog.startswith("image-") and site.personal_overlays:
        personal = _personal_overlay(opts, site, environ, image, cwd)
    environ = dict(environ)
    uid, gid, user, pw_home, gecos, shell, group = _user(environ)
    home, home_src = environ.get("HOME") or pw_home, None
    if opts.home:
        home_src, home = home_spec(opts.home)
    elif getattr(opts, "fakeroot", False) and uid != 0:
        home_src, home = fakeroot_home(opts, home)
    return Request(opts, image, environ, session_dir(environ), site, uid, gid, user,
                   home, gecos, shell, group, cwd, gone, home_src,
                   overlay_layers(opts, image, site, cwd, personal))


def overlay_layers(opts, image, site, cwd, personal=None):
    """The overlay layers of a launch (image.overlay.layers), resolved once; nothing
    imported nor read without --overlay, --writable(-tmpfs) or a SIF (which may carry
    an overlay partition of its own). personal: the personal overlay's path (its
    layer is marked, for its messages)."""
    if not (opts.overlays or opts.writable_tmpfs or opts.writable or image.kind == "sif"):
        return []
    from hpcimage.image import overlay
    out = overlay.layers(opts.overlays, image, opts.writable, opts.writable_tmpfs,
                         site.writable_tmpfs_size, cwd, opts.warnings)
    for x in out:
        x.personal = personal is not None and x.path == personal
    return out


def personal_writable(opts, cwd):
    """The personal overlay is mounted writable by image-shell and by --fakeroot (the
    ways a user installs software) unless the call brings a writable layer of its own
    (a writable --overlay, --writable-tmpfs, --writable); read-only otherwise (a shared
    lock: job arrays, MPI ranks, a second terminal), below the user's layers."""
    if not (opts.prog == "image-shell" or getattr(opts, "fakeroot", False)):
        return False
    if opts.writable or opts.writable_tmpfs:
        return False
    from hpcimage.image import overlay
    return not any(overlay.layer(spec, cwd).writable for spec in opts.overlays)


def _personal_overlay(opts, site, environ, image, cwd):
    """site.json personal_overlays: the loaded module's overlay file in the user's local
    image directory, made on first use (image.overlayfile: mkfs.ext3, once), appended
    to opts.overlays (the one entry point of the overlays: --overlay's list), writable
    or read-only (personal_writable). Its path, or None."""
    module = environ.get("HPCIMAGE_MODULE")
    want = site.personal_overlays.get(module or "")
    if not want:
        return None
    from hpcimage.runtime import localcopy as local
    directory = local.local_dir(site, environ)
    if directory is None:
        raise HpcimageError(f"personal overlay of {module}: the local image directory "
                            f"{site.local!r} cannot be resolved", 1)
    path = local.personal_overlay(module, directory)
    if not os.path.exists(path):
        from hpcimage.image import overlayfile
        try:
            os.makedirs(directory, 0o700, exist_ok=True)
            overlayfile.create(path, want.get("size", 1024), want.get("sparse", True),
                               environ=environ, exist_ok=True)
        except OSError as e:
            raise HpcimageError(f"personal overlay of {module}: {directory}: "
                                f"{e.strerror}", 1) from None
        except HpcimageError as e:
            raise HpcimageError(f"personal overlay of {module}: {e.message}", e.status) \
                from None
    writable = personal_writable(opts, cwd)
    if writable and getattr(image, "crypt", None):
        opts.warnings.append(f"your personal overlay {path} is not encrypted: what you "
                             "write there is stored in clear")
    opts.overlays.append(path if writable else path + ":ro")
    return path


def fakeroot_home(opts, host_home):
    """--fakeroot without -H: the home is /root (as Apptainer's), the caller's home
    directory bound there; (None, "/root") where --no-home, --no-mount home or
    --contain leave it out (an empty one under --contain)."""
    if (opts.no_home or opts.contain or "home" in opts.no_mount or not host_home
            or host_home == "/"):
        return None, "/root"
    return host_home, "/root"


def home_spec(spec):
    """-H SRC[:DST] -> (the absolute SRC, DST; DST defaults to SRC), as Apptainer's."""
    parts = spec.split(":")
    if len(parts) > 2 or not parts[0]:
        raise HpcimageError(f"--home {spec}: want SRC[:DST]", 2)
    src = os.path.abspath(parts[0])
    dst = parts[1] if len(parts) == 2 and parts[1] else src
    if not dst.startswith("/"):
        raise HpcimageError(f"--home {spec}: the destination must be an absolute path", 2)
    return src, os.path.normpath(dst)


def _open(path):
    from hpcimage.image import open_image
    return open_image(path)


def _open_image(path, opts, environ):
    """open_image, saying what the user can do about a missing image."""
    from hpcimage.runtime.command import IMAGE_SUFFIXES
    if os.path.lexists(path):
        return _open(path)
    if opts.prog.startswith("image-"):
        module = environ.get("HPCIMAGE_MODULE")
        raise HpcimageError(f"{path}: image not found (the image of "
                            f"{'module ' + module if module else 'HPCIMAGE_IMAGE'} is "
                            "missing on this node)", 2)
    hint = ""
    if "/" not in path and not path.endswith(IMAGE_SUFFIXES):
        what = "COMMAND [ARGS...]" if opts.verb == "exec" else "[ARGS...]"
        hint = f" (the image comes first: {opts.prog} [OPTIONS] IMAGE {what}"
        if environ.get("HPCIMAGE_IMAGE"):
            hint += f"; the loaded module's image: image-{opts.verb} {what}"
        hint += ")"
    raise HpcimageError(f"{path}: image not found{hint}", 2)


def _user(environ):
    import pwd
    import grp
    uid, gid = os.getuid(), os.getgid()
    try:
        pw = pwd.getpwuid(uid)
        name, home, gecos, shell = pw.pw_name, pw.pw_dir, pw.pw_gecos, pw.pw_shell
    except KeyError:
        name = environ.get("USER") or f"user{uid}"
        home, gecos, shell = environ.get("HOME") or "/", "", "/bin/sh"
    try:
        group = grp.getgrgid(gid).gr_name
    except KeyError:
        group = name
    return uid, gid, name, home, gecos, shell, group


def session_dir(environ):
    """HPCIMAGE_SESSION_DIR, else the first of SESSION_DIRS that exists."""
    d = environ.get("HPCIMAGE_SESSION_DIR")
    if d:
        return d
    for d in SESSION_DIRS:
        if os.path.isdir(d):
            return d
    raise HpcimageError("no directory to hold the session mounts: create /var/lib/hpcimage/mnt")


def _cwd():
    """(the current directory, None), or (None, its name) when it was deleted."""
    try:
        return os.getcwd(), None
    except OSError:
        pass
    try:
        name = os.readlink("/proc/self/cwd")
    except OSError:
        name = ""
    if name.endswith(" (deleted)"):
        name = name[:-len(" (deleted)")]
    return None, name or "the current directory"
