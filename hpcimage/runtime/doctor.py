"""`hpcimage doctor`: is this node ready to start containers?

One line per check, OK, WARN or FAIL, with what was found and, where it is not OK,
what to do. FAIL is said only on the lines a container needs (NEEDED: user
namespaces, /dev/fuse, squashfuse, the session directory, the site configuration);
the others (overlayfs, fuse-overlayfs, fuse2fs, subordinate ids, Lmod, the MPI
joiner) are at worst WARN. Exit 0 when no line FAILs, 1 otherwise; `--json` prints
the lines as a list of {name, status, detail, fix}.

The probes do what the runtime does, in one forked child that exits afterwards:
open /dev/fuse read-write, unshare a user and mount namespace and map the uid, make
the mounts private, mount a tmpfs on the session directory, mount an overlay
(userxattr) on a tmpfs and write through it. Run as root, the child first becomes
`nobody`: root needs no user namespace, and the admin wants to know what users get.
Nothing is mounted on the host; nothing is written outside the child's tmpfs.

    checks(environ, site_config=None, site_yaml=None) -> [line]
    run(as_json, site_config, site_yaml) -> exit status

`hpcimage mpi doctor` shares the namespace probe and the sysctl reader. Not imported
by the runtime.
"""
import errno
import glob
import json
import os
import pwd
import stat
import sys

from hpcimage.runtime.request import SESSION_DIRS
from hpcimage.runtime.rootfs import map_ids
from hpcimage.linux.paths import which
from hpcimage.linux import syscalls as sc

OK, WARN, FAIL = "OK", "WARN", "FAIL"
NEEDED = ("user-namespaces", "dev-fuse", "squashfuse", "session-directory", "site-config")
FUSE_DEV = "/dev/fuse"
PR_SET_DUMPABLE = 4
LMOD_PREFIXES = ("/usr/share/lmod/lmod", "/opt/apps/lmod/lmod", "/usr/local/lmod/lmod",
                 "/opt/ohpc/admin/lmod/lmod", "/opt/lmod/lmod")
MODULECMD_TCL = ("/usr/share/Modules/libexec/modulecmd.tcl",            # RHEL/Rocky
                 "/usr/share/modules/libexec/modulecmd.tcl",            # upstream default
                 "/usr/lib/x86_64-linux-gnu/modulecmd.tcl",             # Debian/Ubuntu
                 "/usr/lib/aarch64-linux-gnu/modulecmd.tcl")
TOOL_DIRS = ("/usr/bin", "/usr/sbin", "/usr/local/bin", "/sbin")


def line(name, status, detail, fix=None):
    return {"name": name, "status": status, "detail": detail, "fix": fix}


def read_sysctl(path):
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


# ------------------------------------------------------------------ the probe

class StepError(Exception):
    """A probe step failed: 'step: reason'."""


def _why(e):
    """The reason alone (the syscall wrappers put their own name before strerror)."""
    return os.strerror(e.errno) if e.errno else (e.strerror or str(e))


def _step(what, func, *args):
    try:
        return func(*args)
    except OSError as e:
        raise StepError(f"{what}: {_why(e)}") from None


def enter_namespaces():
    """The runtime's first steps (execute.execute: userns, private) for this process:
    a user namespace with the uid/gid mapped onto themselves (root: a mount namespace
    alone), then every mount private. StepError names the step that failed."""
    uid, gid = os.getuid(), os.getgid()
    if uid == 0:
        _step("unshare(CLONE_NEWNS)", sc.unshare, sc.CLONE_NEWNS)
    else:
        _step("unshare(CLONE_NEWUSER)", sc.unshare, sc.CLONE_NEWUSER | sc.CLONE_NEWNS)
        _step("writing the uid/gid map", map_ids, uid, gid)
    _step("making the mounts private", sc.mount, None, "/", None, sc.MS_REC | sc.MS_PRIVATE)


def nobody():
    """(uid, gid, name) the probes run as when the caller is root."""
    try:
        pw = pwd.getpwnam("nobody")
        return pw.pw_uid, pw.pw_gid, "nobody"
    except KeyError:
        return 65534, 65534, "uid 65534"


def in_child(func, as_nobody=False):
    """(func()'s value, None) or (None, why), func run in a forked child whose
    namespaces and mounts die with it. func's value must be JSON-able."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(r)
            try:
                if as_nobody and os.getuid() == 0:
                    uid, gid, _ = nobody()
                    os.setgroups([])
                    os.setresgid(gid, gid, gid)
                    os.setresuid(uid, uid, uid)
                    sc.prctl(PR_SET_DUMPABLE, 1)     # else /proc/self/uid_map is root's
                out = {"value": func()}
            except StepError as e:
                out = {"error": str(e)}
            except OSError as e:
                out = {"error": _why(e)}
            os.write(w, json.dumps(out).encode())
            os._exit(0)
        finally:
            os._exit(1)
    os.close(w)
    with os.fdopen(r, "rb") as fh:
        data = fh.read()
    _, status = os.waitpid(pid, 0)
    try:
        out = json.loads(data)
    except ValueError:
        return None, f"the probe died (wait status {status})"
    return out.get("value"), out.get("error")


def _probe_node(session_dir):
    """In the child: each check's error (None: worked; missing key: not tried)."""
    out = {}
    try:
        os.close(os.open(FUSE_DEV, os.O_RDWR | os.O_CLOEXEC))
        out["fuse"] = None
    except OSError as e:
        out["fuse"] = _why(e)
        out["fuse_errno"] = e.errno
    try:
        enter_namespaces()
    except StepError as e:
        out["userns"] = str(e)
        return out
    out["userns"] = None
    base = None
    if session_dir:
        try:
            sc.mount("hpcimage", session_dir, "tmpfs", sc.MS_NOSUID | sc.MS_NODEV, "mode=0755")
            out["session"], base = None, session_dir
        except OSError as e:
            out["session"] = f"mount tmpfs on {session_dir}: {_why(e)}"
    try:
        if base is None:
            base = "/tmp"
            _step(f"mount tmpfs on {base}", sc.mount, "hpcimage", base, "tmpfs", 0, "mode=0755")
        lo, up, wk, mnt = (os.path.join(base, d) for d in ("lower", "upper", "work", "merged"))
        for d in (lo, up, wk, mnt):
            os.mkdir(d)
        with open(os.path.join(lo, "from-lower"), "w") as f:
            f.write("x")
        _step("mount -t overlay -o userxattr", sc.mount, "overlay", mnt, "overlay", 0,
              f"lowerdir={lo},upperdir={up},workdir={wk},userxattr")
        with open(os.path.join(mnt, "from-lower"), "a") as f:    # copy-up
            f.write("y")
        if not os.path.exists(os.path.join(up, "from-lower")):
            raise StepError("a write through the overlay did not reach the upper layer")
        out["overlay"] = None
    except StepError as e:
        out["overlay"] = str(e)
    except OSError as e:
        out["overlay"] = f"writing through the overlay: {_why(e)}"
    return out


# ----------------------------------------------------------------- the checks

def check_userns(probe, probe_err, who):
    maxns = read_sysctl("/proc/sys/user/max_user_namespaces")
    clone = read_sysctl("/proc/sys/kernel/unprivileged_userns_clone")
    aa = read_sysctl("/proc/sys/kernel/apparmor_restrict_unprivileged_userns")
    facts = [f"user.max_user_namespaces={maxns if maxns is not None else '?'}"]
    if clone is not None:
        facts.append(f"kernel.unprivileged_userns_clone={clone}")
    if aa is not None:
        facts.append(f"kernel.apparmor_restrict_unprivileged_userns={aa}")
    facts = ", ".join(facts)
    err = probe_err or probe.get("userns")
    if err is None:
        return line("user-namespaces", OK, f"{facts}; a test namespace worked{who}")
    if maxns == "0":
        fix = ("sysctl -w user.max_user_namespaces=15000, and the same in /etc/sysctl.d/ "
               "(RHEL 7.4 to 7.9 ship it 0: the sysctl alone turns them on)")
    elif clone == "0":
        fix = ("sysctl -w kernel.unprivileged_userns_clone=1, and the same in "
               "/etc/sysctl.d/ (Debian)")
    elif aa == "1":
        fix = ("sysctl -w kernel.apparmor_restrict_unprivileged_userns=0 (Ubuntu), or an "
               "AppArmor profile that allows `userns,` for the python3 that runs hpcimage")
    else:
        fix = "allow unprivileged user namespaces for users on this node (kernel settings)"
    return line("user-namespaces", FAIL, f"{facts}; a test namespace failed{who}: {err}",
                fix + "; containers cannot start without them")


def check_fuse(probe, probe_err, who):
    fix_mode = ('chmod 0666 /dev/fuse, and make it last: a udev rule '
                'KERNEL=="fuse", MODE="0666" in /etc/udev/rules.d/99-fuse.rules')
    try:
        st = os.stat(FUSE_DEV)
    except FileNotFoundError:
        return line("dev-fuse", FAIL, f"{FUSE_DEV}: missing",
                    "modprobe fuse (and load it at boot: /etc/modules-load.d/fuse.conf)")
    except OSError as e:
        return line("dev-fuse", FAIL, f"{FUSE_DEV}: {e.strerror}", fix_mode)
    mode = f"mode {stat.S_IMODE(st.st_mode):04o}"
    if not stat.S_ISCHR(st.st_mode):
        return line("dev-fuse", FAIL, f"{FUSE_DEV}: not a character device",
                    "rm it and modprobe fuse (the kernel creates the device)")
    if probe_err:
        return line("dev-fuse", FAIL, f"{FUSE_DEV} ({mode}): not tested: {probe_err}", None)
    err = probe.get("fuse")
    if err is None:
        return line("dev-fuse", OK, f"{FUSE_DEV} ({mode}) opened read-write{who}")
    if probe.get("fuse_errno") in (errno.EACCES, errno.EPERM):
        fix = fix_mode
    else:
        fix = "modprobe fuse; SquashFS and SIF images are mounted through it"
    return line("dev-fuse", FAIL, f"{FUSE_DEV} ({mode}): cannot open read-write{who}: {err}",
                fix)


def check_squashfuse(environ):
    from hpcimage.image import squashfs
    from hpcimage.host import elf
    install = ("install squashfuse (Debian/Ubuntu: apt install squashfuse; "
               "RHEL/Rocky: dnf install squashfuse, from EPEL)")
    override = environ.get("HPCIMAGE_SQUASHFUSE")
    found = {}                      # realpath -> the first path naming it
    for p in squashfs.candidates(environ.get("PATH")):
        found.setdefault(os.path.realpath(p), p)
    found = list(found.values())
    if override:
        if not (os.path.isfile(override) and os.access(override, os.X_OK)):
            return line("squashfuse", FAIL, f"HPCIMAGE_SQUASHFUSE={override}: not an "
                        "executable file", "unset HPCIMAGE_SQUASHFUSE or name squashfuse_ll")
        chosen, how = override, " (HPCIMAGE_SQUASHFUSE)"
    elif not found:
        return line("squashfuse", FAIL, "neither squashfuse_ll nor squashfuse on PATH, "
                    "/usr/bin or /usr/local/bin: SquashFS and SIF images cannot start",
                    install)
    else:
        chosen, how = found[0], ""
    try:
        needed = elf.info(chosen).needed
    except (OSError, ValueError):
        needed = []
    if any(n.startswith("libfuse.so.2") for n in needed) and \
            not any(n.startswith("libfuse3.") for n in needed):
        return line("squashfuse", FAIL, f"{chosen} is linked with libfuse 2; the runtime "
                    "hands it the FUSE connection as /dev/fd/N, which needs libfuse >= 3.3",
                    "install a squashfuse built with libfuse3 (fuse3)")
    others = [p for p in found if os.path.realpath(p) != os.path.realpath(chosen)]
    detail = f"the runtime uses {chosen}{how}" + (
        f"; also found: {', '.join(others)}" if others else "")
    if os.path.basename(chosen) == "squashfuse":
        return line("squashfuse", WARN, detail + " (single-threaded: metadata-heavy jobs "
                    "run several times slower)", "install squashfuse_ll (multithreaded; "
                    "in the squashfuse package of Debian/Ubuntu)")
    return line("squashfuse", OK, detail)


def check_overlay(probe, probe_err):
    fix = ("Linux 5.11 or newer mounts overlayfs in a user namespace (userxattr); "
           "later features (--overlay, --writable-tmpfs) need it, or fuse-overlayfs")
    if probe_err or probe.get("userns"):
        return line("overlayfs", WARN, "not tried: no user namespace (above)", fix)
    err = probe.get("overlay")
    if err is None:
        return line("overlayfs", OK, "an overlay (userxattr) on a tmpfs mounted in a user "
                    "namespace; a write reached the upper layer")
    return line("overlayfs", WARN, f"kernel overlayfs in a user namespace: {err}", fix)


def _find_tool(name, environ):
    dirs = (environ.get("PATH") or "").split(":") + list(TOOL_DIRS)
    return which(name, ":".join(d for d in dirs if d))


def check_tool(name, environ, packages, used_for):
    path = _find_tool(name, environ)
    if path:
        return line(name, OK, path)
    return line(name, WARN, f"not found: {used_for}", f"install {packages}")


def _privileged_helper(path):
    """True when path is setuid root or carries file capabilities."""
    try:
        st = os.stat(path)
    except OSError:
        return False
    if st.st_mode & stat.S_ISUID and st.st_uid == 0:
        return True
    try:
        return bool(os.getxattr(path, "security.capability"))
    except OSError:
        return False


def check_subids(environ):
    from hpcimage.linux.idmap import IdMap
    path = environ.get("PATH") or os.defpath
    helpers = [(t, which(t, path)) for t in ("newuidmap", "newgidmap")]
    missing = [t for t, p in helpers if p is None]
    weak = [p for t, p in helpers if p is not None and not _privileged_helper(p)]
    if missing:
        return line("subordinate-ids", WARN, f"{' and '.join(missing)} not found: builds map "
                    "only your own id (packages that own files of other users cannot "
                    "install)", "install uidmap (Debian/Ubuntu) or shadow-utils (RHEL/Rocky)")
    if weak:
        return line("subordinate-ids", WARN, f"{', '.join(weak)}: neither setuid root nor "
                    "with file capabilities: builds with subordinate ids fail",
                    "chmod u+s " + " ".join(weak) + " (or setcap cap_setuid+ep / "
                    "cap_setgid+ep, as RHEL ships them)")
    if os.getuid() == 0:
        return line("subordinate-ids", OK, "newuidmap and newgidmap usable; root builds "
                    "without a user namespace (run doctor as a user to check their ranges)")
    m = IdMap.choose("auto")
    name = pwd.getpwuid(os.getuid()).pw_name if _has_pw() else str(os.getuid())
    if m.mode == "subid":
        return line("subordinate-ids", OK, f"{name}: uids {m.subuid[0]}+{m.subuid[1]} "
                    f"(/etc/subuid), gids {m.subgid[0]}+{m.subgid[1]} (/etc/subgid); "
                    "newuidmap and newgidmap usable")
    return line("subordinate-ids", WARN, f"{m.why}: builds map only your own id (packages "
                "that own files of other users cannot install, chown fails)",
                f"add ranges: usermod --add-subuids 100000-165535 --add-subgids "
                f"100000-165535 {name} (or the site's ranges, unique per user)")


def _has_pw():
    try:
        pwd.getpwuid(os.getuid())
        return True
    except KeyError:
        return False


def session_directory(environ):
    """(directory or None, line) as request.session_dir chooses it."""
    d = environ.get("HPCIMAGE_SESSION_DIR")
    if d:
        try:
            why = None if stat.S_ISDIR(os.stat(d).st_mode) else "not a directory"
        except OSError as e:
            why = e.strerror
        if why:
            return None, line("session-directory", FAIL, f"HPCIMAGE_SESSION_DIR={d}: {why}",
                              "create it (a directory every user can reach), or unset "
                              "HPCIMAGE_SESSION_DIR")
        return d, line("session-directory", OK, f"{d} (HPCIMAGE_SESSION_DIR)")
    for d in SESSION_DIRS:
        if os.path.isdir(d):
            if d == SESSION_DIRS[0]:
                return d, line("session-directory", OK, d)
            return d, line("session-directory", WARN, f"{d}: a fallback, because "
                           f"{SESSION_DIRS[0]} is missing", "mkdir -p "
                           f"{SESSION_DIRS[0]} (the runtime mounts a private tmpfs "
                           "on it inside each container, never on the host)")
    return None, line("session-directory", FAIL, "none of " + ", ".join(SESSION_DIRS)
                      + " exists", f"mkdir -p {SESSION_DIRS[0]}")


def _session_line(sd_line, sd, probe, probe_err):
    """The session line, with what the probe's tmpfs mount on it said."""
    if sd is None or probe_err or probe.get("userns") or "session" not in probe:
        return sd_line
    err = probe["session"]
    if err is None:
        sd_line["detail"] += "; a tmpfs mounted on it in a user namespace"
        return sd_line
    return line("session-directory", FAIL, f"{sd}: {err}",
                "make it a directory every user can search (mode 0755)")


def find_site_config(environ, option, site=None):
    """(path or None, how it was found). `site`: the --site Site, whose wrappers
    directory holds its rendered site.json (the last resort: what a module load put
    on PATH is what users get)."""
    if option:
        return option, "--site-config"
    if environ.get("HPCIMAGE_SITE_CONFIG"):
        return environ["HPCIMAGE_SITE_CONFIG"], "HPCIMAGE_SITE_CONFIG"
    exe = which("image-exec", environ.get("PATH") or "")
    if exe:
        return os.path.join(os.path.dirname(os.path.realpath(exe)), "site.json"), \
            f"beside {exe}"
    if site is not None:
        return os.path.join(site.roots()["wrappers"], "site.json"), \
            "the wrappers directory of --site"
    return None, None


def check_site_config(environ, option, site_yaml):
    from hpcimage.config.policy import Policy, load_site
    from hpcimage.errors import HpcimageError
    from hpcimage.config import site as sitemod
    site = sitemod.load(site_yaml) if site_yaml else None   # bad input: UsageError, exit 2
    path, how = find_site_config(environ, option, site)
    if path is None:
        return line("site-config", WARN, "no site.json: HPCIMAGE_SITE_CONFIG unset and no "
                    "image-exec on PATH", "load an image module (module load Name/version), "
                    "or pass --site-config PATH")
    if not os.path.isfile(path):
        return line("site-config", FAIL, f"{path} ({how}): missing",
                    "run hpcimage generate for the site, or name the right site.json")
    try:
        data = load_site({"HPCIMAGE_SITE_CONFIG": path})
        Policy.from_json(data, path)      # what every launch does: unknown keys fail it
    except HpcimageError as e:
        return line("site-config", FAIL, e.message, "run hpcimage generate for the site")
    where = f"{path} ({how})"
    if site is not None:
        want = json.loads(json.dumps(site.policy()))
        got = {k: v for k, v in data.items() if k != "_comment"}
        if got != want:
            keys = sorted(k for k in set(got) | set(want) if got.get(k) != want.get(k))
            return line("site-config", WARN, f"{where}: stale: differs from what {site_yaml} "
                        f"renders ({', '.join(keys)})",
                        f"hpcimage generate --site {site_yaml} (and install the rendering)")
        return line("site-config", OK, f"{where}: current with {site_yaml}")
    version = data.get("version")
    if version != sitemod.POLICY_VERSION:
        return line("site-config", WARN, f"{where}: format version {version}, this hpcimage "
                    f"writes {sitemod.POLICY_VERSION}", "run hpcimage generate for the site")
    return line("site-config", OK, f"{where}: format version {version} (pass --site "
                "site.yaml to compare it with its source)")


def check_lmod(environ):
    from hpcimage.host import lmod
    tried = lmod.candidates(None, environ) + [(p, "the usual paths") for p in LMOD_PREFIXES]
    seen = []
    for prefix, where in tried:
        cmd = os.path.join(prefix, "libexec", "lmod")
        if prefix in seen:
            continue
        seen.append(prefix)
        if os.path.isfile(cmd) and os.access(cmd, os.X_OK):
            real = os.path.realpath(prefix)
            ver = f" ({os.path.basename(real)})" if real != prefix else ""
            return line("lmod", OK, f"{cmd}{ver}, from {where}")
    return line("lmod", WARN, "no Lmod (no libexec/lmod in " + ", ".join(seen) + "): users "
                "cannot `module load` the site's images unless Environment Modules is "
                "there", "install Lmod (Debian/Ubuntu: lmod; RHEL/Rocky: Lmod, from EPEL), "
                "or set LMOD_CMD")


def check_envmodules(environ):
    paths = []
    if environ.get("MODULES_CMD"):
        paths.append(environ["MODULES_CMD"])
    if environ.get("MODULESHOME"):
        paths.append(os.path.join(environ["MODULESHOME"], "libexec", "modulecmd.tcl"))
    paths += MODULECMD_TCL
    for p in paths:
        if os.path.isfile(p):
            return line("environment-modules", OK, f"{p} (for the modulefiles-tcl tree)")
    return line("environment-modules", OK, "not found; optional: only sites that use the "
                "Tcl modulefiles (modulefiles-tcl) need it")


def check_joiner(environ):
    from hpcimage.runtime.mpi import recipe as mpi
    helper = mpi.JOIN_HELPER
    if not os.access(helper, os.X_OK):
        return line("mpi-joiner", WARN, f"{helper}: not built: every image-mpi rank starts "
                    "a Python runtime (slower launch)", "reinstall hpcimage where a C "
                    "compiler (cc) is available")
    # The image-mpi wrapper looks for it below the prefix of the python it runs.
    py = environ.get("HPCIMAGE_PYTHON") or sys.executable
    prefix = py.rsplit("/bin/", 1)[0]
    pattern = f"{prefix}/lib/python3*/site-packages/hpcimage/runtime/mpi/hpcimage-join"
    if not any(os.path.samefile(p, helper) for p in glob.glob(pattern)
               if os.path.exists(p)):
        return line("mpi-joiner", WARN, f"{helper} is built, but the image-mpi wrappers look "
                    f"for it as {pattern} and do not find it there: every rank starts a "
                    "Python runtime", "install hpcimage into a virtual environment "
                    "(its site-packages), as docs/install.md describes")
    return line("mpi-joiner", OK, f"{helper} (found by the image-mpi wrappers of {py})")


def checks(environ=None, site_config=None, site_yaml=None):
    environ = dict(os.environ if environ is None else environ)
    root = os.getuid() == 0
    who = f" (as {nobody()[2]}: what users get)" if root else ""
    sd, sd_line = session_directory(environ)
    probe, probe_err = in_child(lambda: _probe_node(sd), as_nobody=True)
    probe = probe or {}
    return [
        check_userns(probe, probe_err, who),
        check_fuse(probe, probe_err, who),
        check_squashfuse(environ),
        _session_line(sd_line, sd, probe, probe_err),
        check_site_config(environ, site_config, site_yaml),
        check_overlay(probe, probe_err),
        check_tool("fuse-overlayfs", environ, "fuse-overlayfs (Debian/Ubuntu, RHEL/Rocky)",
                   "writable overlays need it where the kernel's overlayfs cannot serve "
                   "(and for ext3 overlays)"),
        check_tool("fuse2fs", environ, "fuse2fs (Debian/Ubuntu) or e2fsprogs (RHEL/Rocky)",
                   "ext3 overlay images and binds from ext3 images need it"),
        check_tool("gocryptfs", environ, "gocryptfs (Debian/Ubuntu, EPEL)",
                   "encrypted images need it"),
        check_tool("gpgv", environ, "gpgv (Debian/Ubuntu) or gnupg2 (RHEL/Rocky)",
                   "verifying PGP-signed images (image-update under a signing policy, "
                   "hpcimage verify) needs it"),
        check_subids(environ),
        check_lmod(environ),
        check_envmodules(environ),
        check_joiner(environ),
    ]


def can_start(lines):
    return not any(ln["status"] == FAIL for ln in lines if ln["name"] in NEEDED)


def render(lines):
    out = []
    for ln in lines:
        out.append(f"{ln['status']:<5} {ln['name']}: {ln['detail']}")
        if ln["fix"] and ln["status"] != OK:
            out.append(f"      fix: {ln['fix']}")
    fails = sum(ln["status"] == FAIL for ln in lines)
    warns = sum(ln["status"] == WARN for ln in lines)
    tail = f" ({warns} warning{'s' if warns != 1 else ''})" if warns else ""
    if can_start(lines):
        out.append(f"result: containers can start here{tail}")
    else:
        out.append(f"result: containers cannot start here: {fails} failed{tail}")
    return "\n".join(out) + "\n"


def run(as_json=False, site_config=None, site_yaml=None, environ=None):
    lines = checks(environ, site_config, site_yaml)
    text = json.dumps(lines, indent=2) + "\n" if as_json else render(lines)
    sys.stdout.write(text)
    sys.stdout.flush()
    return 0 if can_start(lines) else 1
