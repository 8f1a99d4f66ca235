"""`hpcimage mpi doctor`: what image-mpi would find on this node, and why each MPI mode
will or won't work.

Everything is read the way image-mpi reads it (hpcimage.runtime.mpi.launcher), without
starting a container or an MPI job: the launcher image-mpi would exec, the host MPI
library the bind model would bind, the MPI sonames in the image's /etc/ld.so.cache (a
directory image directly, SquashFS and SIF through `unsquashfs -cat`), and how the
ranks of one node would start (shared namespaces, state directory, hpcimage-join).
The only programs run are `srun --mpi=list` / `mpirun --version` (each with a time
limit), `unsquashfs`, and one forked child that tries a user namespace.

    diagnose(image, environ) -> report (a dict, what --json prints)
    render(report) -> text
    run(image, as_json, environ=None) -> exit status: 0 when a mode works, 1 when none

Not imported by the runtime.
"""
import json
import os
import shutil
import subprocess
import sys

from hpcimage.runtime.mpi import launcher as mpi
from hpcimage.runtime.mpi import jobenv, recipe
from hpcimage.host import mpi as hostmpi

FAMILY_NAME = {"openmpi": "Open MPI", "mpich": "MPICH"}
# The PMI flavour each MPI family speaks by default under srun (docs/mpi-setup.md).
FAMILY_PMI = {"openmpi": "pmix", "mpich": "pmi2"}
PROBE_TIMEOUT = 5          # seconds for `srun --mpi=list`, `mpirun --version`
LDCACHE_LIMIT = 16 << 20


def _finding(status, text):
    """status: ok (works), no (does not), warn (works, with a caveat), info."""
    return {"status": status, "text": text}


def _run_quick(argv, environ):
    """(exit status, stdout+stderr text) of argv, or (None, why) when it could not run
    or did not answer within PROBE_TIMEOUT seconds."""
    try:
        r = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, env=dict(environ), timeout=PROBE_TIMEOUT)
    except subprocess.TimeoutExpired:
        return None, f"no answer within {PROBE_TIMEOUT} s"
    except OSError as e:
        return None, e.strerror or str(e)
    return r.returncode, r.stdout.decode(errors="replace")


def parse_mpi_list(text):
    """The plugin names of `srun --mpi=list` (Slurm 20 to 23 formats)."""
    names = []
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("srun:"):
            line = line[5:].strip()
        low = line.lower()
        if not line or "are..." in low or low.startswith("mpi plugin"):
            continue
        if "versions available:" in low:
            names += [v.strip() for v in line.split(":", 1)[1].split(",") if v.strip()]
        elif len(line.split()) == 1:
            names.append(line)
    return list(dict.fromkeys(names))


# ------------------------------------------------------------------ 1. launcher

def _link_chain(exe):
    """exe and the links it goes through (update-alternatives), as implementation_of
    follows them."""
    chain, path = [exe], exe
    while os.path.islink(path) and len(chain) < 12:
        link = os.readlink(path)
        path = link if link.startswith("/") else os.path.join(os.path.dirname(path), link)
        chain.append(path)
    return chain


def launcher(environ, policy):
    from hpcimage.linux.paths import which
    kind, why = mpi.launcher_kind(environ, policy)
    path = environ.get("PATH") or "/usr/bin:/bin"
    exe = which(kind, path)
    if exe is not None and not (os.path.isfile(exe) and os.access(exe, os.X_OK)):
        exe = None
    out = {"kind": kind, "why": why, "path": exe, "found": exe is not None, "findings": []}
    f = out["findings"]
    if exe is None:
        hint = " (load the host MPI module?)" if kind == "mpirun" else ""
        f.append(_finding("no", f"{kind}: not found on PATH ({why}){hint}"))
        return out
    f.append(_finding("ok", f"{kind}: {exe} ({why})"))
    if kind.endswith("srun"):
        out["srun_mpi"] = policy.get("srun_mpi")
        rc, text = _run_quick([exe, "--mpi=list"], environ)
        plugins = parse_mpi_list(text) if rc == 0 else None
        out["pmi_plugins"] = plugins
        if plugins is None:
            why_not = text if rc is None else f"exit {rc}: " + " ".join(text.split())[:200]
            f.append(_finding("warn", f"srun --mpi=list: {why_not}"))
        else:
            f.append(_finding("info", "PMI plugins (srun --mpi=list): "
                              + (" ".join(plugins) or "none listed")))
        pmi = out["srun_mpi"]
        if pmi:
            if plugins is not None and pmi not in plugins:
                f.append(_finding("warn", f"site mpi.srun_mpi={pmi}: not offered by this "
                                  "srun; image-mpi passes --mpi=" + pmi))
            else:
                f.append(_finding("info", f"site mpi.srun_mpi={pmi}: image-mpi passes --mpi={pmi}"))
        else:
            f.append(_finding("info", "site mpi.srun_mpi unset: srun uses Slurm's MpiDefault"))
    else:
        impl = policy.get("implementation") or mpi.implementation_of(exe)
        src = ("site mpi.implementation" if policy.get("implementation")
               else "from " + " -> ".join(_link_chain(exe)))
        out["implementation"] = impl
        if impl:
            f.append(_finding("ok", f"implementation: {impl} ({src})"))
        else:
            f.append(_finding("warn", f"implementation: unknown ({src}); set site "
                              "mpi.implementation to openmpi or mpich"))
        rc, text = _run_quick([exe, "--version"], environ)
        first = next((ln.strip() for ln in text.splitlines() if ln.strip()), "")
        out["version"] = first if rc == 0 else None
        if rc == 0:
            f.append(_finding("info", f"{os.path.basename(exe)} --version: {first}"))
        else:
            f.append(_finding("warn", f"{os.path.basename(exe)} --version: "
                              + (text if rc is None else f"exit {rc}: {first}")))
    return out


# ---------------------------------------------------------------- 2. host MPI

def host_mpi(site, environ):
    """The host library the bind model would bind (hostmpi.bind_contribution's search)."""
    from hpcimage.errors import HpcimageError
    try:
        c = hostmpi.bind_contribution(site, environ, "")
    except HpcimageError as e:
        msg = e.message
        if msg.startswith("--mpi-mode bind: "):
            msg = msg[len("--mpi-mode bind: "):]
        return {"found": False, "reason": msg, "findings": [_finding("no", msg)]}
    lib = next(((os.path.basename(dst), src) for src, dst, _ro, _w in c.binds
                if os.path.dirname(dst) == hostmpi.LIBS_DIR and os.path.basename(dst) in hostmpi.ABI),
               None)
    if lib is None:       # cannot happen unless bind_contribution changes shape
        return {"found": False, "reason": "no MPI library among the binds",
                "findings": [_finding("no", "no MPI library among the bind model's binds")]}
    soname, path = lib
    fam = hostmpi.ABI[soname]
    out = {"found": True, "soname": soname, "path": path, "family": fam,
           "binds": len(c.binds), "findings": []}
    out["findings"].append(_finding("ok", f"{soname} ({FAMILY_NAME[fam]}): {path}, "
                                    f"{len(c.binds)} binds with its dependencies and components"))
    for n in c.notes:
        out["findings"].append(_finding("warn", n))
    return out


# --------------------------------------------------------------- 3. image MPI

def _image_ldcache(image):
    """(bytes of the image's /etc/ld.so.cache or None, why not)."""
    if image.kind == "sandbox":
        from hpcimage.host import HostRoot
        try:     # chroot semantics: a symlink in the image stays in the image
            return HostRoot(image.path).read_bytes("/etc/ld.so.cache", LDCACHE_LIMIT), None
        except FileNotFoundError:
            return None, "no /etc/ld.so.cache in the image"
        except OSError as e:
            return None, f"/etc/ld.so.cache: {e.strerror or e}"
    if shutil.which("unsquashfs") is None:
        return None, "unsquashfs not found on PATH: cannot read the image without starting it"
    from hpcimage.image.tree import unsquashfs_cat
    data = unsquashfs_cat(image.path, "etc/ld.so.cache", image.offset)
    if data is None:
        return None, "no /etc/ld.so.cache in the image (or unsquashfs could not read it)"
    return data, None


def image_mpi(image):
    from hpcimage.host import ldcache
    out = {"path": image.path, "kind": image.kind, "mpi": [], "findings": []}
    f = out["findings"]
    data, why = _image_ldcache(image)
    if data is None:
        out["reason"] = why
        f.append(_finding("no", why + "; an MPI reached only through LD_LIBRARY_PATH is "
                          "not seen"))
        return out
    try:
        entries = ldcache.parse_full(data)
    except ValueError as e:
        out["reason"] = f"/etc/ld.so.cache: {e}"
        f.append(_finding("no", out["reason"]))
        return out
    f64, _f32 = ldcache.host_flags()
    seen = set()
    for name, flags, path, _hw in entries:
        ok = flags == f64 if f64 is not None else ldcache.is_64(flags)
        if ok and name in hostmpi.ABI and name not in seen:
            seen.add(name)
            out["mpi"].append({"soname": name, "family": hostmpi.ABI[name], "path": path})
    for m in out["mpi"]:
        f.append(_finding("ok", f"{m['soname']} ({FAMILY_NAME[m['family']]}): {m['path']}"))
    if not out["mpi"]:
        out["reason"] = ("no MPI in the image: none of " + ", ".join(hostmpi.ABI)
                         + " in its /etc/ld.so.cache")
        f.append(_finding("no", out["reason"]))
    return out


# ------------------------------------------------------------ 5. ranks on a node

def _userns_probe():
    """None when a child can make the runtime's namespaces (user + mount, private
    mounts), else why not."""
    from hpcimage.runtime.doctor import enter_namespaces, in_child
    return in_child(enter_namespaces)[1]


def state_dir(environ):
    """The rules of shared.state_base, checked without creating anything."""
    parent = environ.get("HPCIMAGE_MPI_STATE", "/tmp")
    base = os.path.join(parent, f"hpcimage-{os.getuid()}")
    out = {"path": base, "usable": False}
    try:
        st = os.lstat(base)
    except FileNotFoundError:
        if os.path.isdir(parent) and os.access(parent, os.W_OK | os.X_OK):
            out.update(usable=True, text=f"{base}: created by the first rank")
        else:
            out["text"] = f"{base}: cannot be created ({parent} is not a writable directory)"
        return out
    except OSError as e:
        out["text"] = f"{base}: {e.strerror}"
        return out
    import stat
    if stat.S_ISLNK(st.st_mode):
        out["text"] = f"{base}: a symbolic link; image-mpi refuses it"
    elif not stat.S_ISDIR(st.st_mode):
        out["text"] = f"{base}: not a directory; image-mpi refuses it"
    elif st.st_uid != os.getuid():
        out["text"] = f"{base}: owned by uid {st.st_uid}, not you; image-mpi refuses it"
    else:
        out.update(usable=True, text=f"{base}: yours (mode {stat.S_IMODE(st.st_mode):04o})")
    return out


def ranks(environ):
    from hpcimage.runtime.doctor import read_sysctl
    share = environ.get("HPCIMAGE_MPI_SHARE", "1") != "0"
    out = {"share": share, "findings": []}
    f = out["findings"]
    if share:
        f.append(_finding("ok", "sharing on: the ranks of one job on one node share one user "
                          "namespace, one mount namespace and one image mount (CMA works)"))
    else:
        f.append(_finding("warn", "sharing off (HPCIMAGE_MPI_SHARE=0): each rank gets its own "
                          "namespaces and image mount; single-copy shared memory (CMA) is "
                          "switched off, slower for large messages"))
    # User namespaces.
    maxns = read_sysctl("/proc/sys/user/max_user_namespaces")
    err = _userns_probe()
    out["user_namespaces"] = {"max_user_namespaces": maxns, "usable": err is None,
                              "error": err}
    if os.getuid() == 0:
        label = "running as root: no user namespace needed"
    else:
        label = f"user namespaces: max_user_namespaces={maxns if maxns is not None else '?'}"
    if err is None:
        f.append(_finding("ok", label + (", a test namespace worked" if os.getuid() else "")))
    else:
        f.append(_finding("no", f"{label}; a test namespace failed: {err} (image-mpi cannot "
                          "start containers: ask for user.max_user_namespaces > 0)"))
    aa = read_sysctl("/proc/sys/kernel/apparmor_restrict_unprivileged_userns")
    if aa == "1" and os.getuid() != 0:
        f.append(_finding("warn", "kernel.apparmor_restrict_unprivileged_userns=1: an AppArmor "
                          "profile may deny mounts in the container"))
    # State directory.
    sd = state_dir(environ)
    out["state_dir"] = sd
    if not share:
        f.append(_finding("info", f"state directory: not used ({sd['path']})"))
    elif sd["usable"]:
        f.append(_finding("ok", f"state directory: {sd['text']}"))
    else:
        f.append(_finding("no", f"state directory: {sd['text']}: every rank fails; set "
                          "HPCIMAGE_MPI_STATE=DIR (a directory of yours) or "
                          "HPCIMAGE_MPI_SHARE=0 (per-rank namespaces)"))
    # The joiner.
    built = os.access(recipe.JOIN_HELPER, os.X_OK)
    used = recipe.join_helper(environ)
    out["joiner"] = {"path": recipe.JOIN_HELPER, "built": built, "used": used is not None}
    if used:
        f.append(_finding("ok", f"joiner: {used} (ranks after the first on a node start "
                          "without Python)"))
    elif not built:
        f.append(_finding("warn", f"joiner: not built ({recipe.JOIN_HELPER} missing): every rank "
                          "starts a Python runtime (slower launch; reinstall hpcimage with a "
                          "C compiler)"))
    else:
        off = "HPCIMAGE_MPI_SHARE=0" if not share else "HPCIMAGE_MPI_JOIN=0"
        f.append(_finding("info", f"joiner: built but off ({off}): every rank starts a "
                          "Python runtime"))
    # Per-rank fallback.
    out["per_rank_env"] = {} if share else dict(jobenv.NO_CMA)
    if not share:
        f.append(_finding("info", "set for every rank (unless already set): "
                          + " ".join(f"{k}={v}" for k, v in jobenv.NO_CMA.items())))
    out["blockers"] = [x["text"] for x in f if x["status"] == "no"]
    return out


# ----------------------------------------------------------------- 4. verdicts

def verdicts(lau, host, img, rk):
    blockers = []
    if not lau["found"]:
        blockers.append(f"no launcher ({lau['kind']} not found)")
    blockers += rk["blockers"]
    hybrid = {"works": False, "findings": []}
    bind = {"works": False, "findings": []}
    impl = lau.get("implementation")
    # hybrid
    if img is None:
        hybrid["reason"] = "no image given (--image IMAGE, or load an image module)"
    elif not img["mpi"]:
        hybrid["reason"] = img.get("reason") or "no MPI in the image"
    else:
        fams = sorted({m["family"] for m in img["mpi"]})
        names = ", ".join(m["soname"] for m in img["mpi"])
        hybrid["works"] = True
        hybrid["reason"] = (f"the image's {' and '.join(FAMILY_NAME[x] for x in fams)} "
                            f"({names}), wired to the host launcher through PMIx/PMI")
        if lau["found"] and not lau["kind"].endswith("srun"):
            if impl and impl not in fams:
                hybrid["findings"].append(_finding(
                    "warn", f"the image's MPI is {'/'.join(fams)} but mpirun is {impl}: "
                    "the ranks may not wire up; use the image family's launcher "
                    "(--launcher, or the host module of that family)"))
            elif not impl:
                hybrid["findings"].append(_finding(
                    "warn", "mpirun's implementation is unknown: cannot check that it "
                    "matches the image's MPI"))
        elif lau["found"]:
            plugins = lau.get("pmi_plugins")
            for fam in fams:
                want = FAMILY_PMI[fam]
                if plugins is not None and not any(p.startswith(want) for p in plugins):
                    hybrid["findings"].append(_finding(
                        "warn", f"the image's {FAMILY_NAME[fam]} wires up through {want}, "
                        "which srun does not offer"))
                elif lau.get("srun_mpi") and not lau["srun_mpi"].startswith(want):
                    hybrid["findings"].append(_finding(
                        "warn", f"the image's {FAMILY_NAME[fam]} wires up through {want}; "
                        f"the site's srun_mpi is {lau['srun_mpi']}"))
    # bind
    if host["found"]:
        bind["works"] = True
        bind["reason"] = (f"the host's {host['soname']} ({FAMILY_NAME[host['family']]}) bound "
                          "into the image")
        abi = ", ".join(s for s, fam in hostmpi.ABI.items() if fam == host["family"])
        bind["findings"].append(_finding(
            "info", f"programs must be linked against the {FAMILY_NAME[host['family']]} ABI "
            f"({abi}); a mismatch is refused at launch; the image's glibc must be at "
            "least as new as the host library needs"))
        if lau["found"] and impl and impl != host["family"]:
            bind["findings"].append(_finding(
                "warn", f"mpirun is {impl} but the host library is {host['family']}"))
    else:
        bind["reason"] = host["reason"]
    for v in (hybrid, bind):
        if v["works"] and blockers:
            v["works"] = False
            v["reason"] += "; but " + "; ".join(blockers)
    return {"hybrid": hybrid, "bind": bind}


# --------------------------------------------------------------------- report

def resolve_image(arg, site, environ):
    """(Image or None, note). --image as given; else $HPCIMAGE_IMAGE, through the
    user's local copy as the wrappers do. UsageError for a bad image."""
    from hpcimage.image import open_image
    if arg:
        return open_image(arg), "--image"
    mod = environ.get("HPCIMAGE_IMAGE")
    if not mod:
        return None, None
    from hpcimage.runtime import localcopy as local
    chosen = local.choose(mod, site, environ)
    note = "HPCIMAGE_IMAGE" + (f" (the local copy of {mod})" if chosen != mod else "")
    return open_image(chosen), note


def diagnose(image_arg=None, environ=None):
    from hpcimage.config.policy import load_policy
    environ = dict(os.environ if environ is None else environ)
    site = load_policy(environ)
    policy = site.mpi or {}
    image, source = resolve_image(image_arg, site, environ)
    lau = launcher(environ, policy)
    host = host_mpi(site, environ)
    img = image_mpi(image) if image is not None else None
    if img is not None:
        img["source"] = source
    rk = ranks(environ)
    modes = verdicts(lau, host, img, rk)
    return {"image": img, "launcher": lau, "host_mpi": host, "modes": modes,
            "default_mode": site.mpi_setting("mode"),
            "ranks": rk,
            "site_config": environ.get("HPCIMAGE_SITE_CONFIG") or None,
            "works": [m for m in ("hybrid", "bind") if modes[m]["works"]]}


def _lines(findings):
    return [f"  {x['status']:<5} {x['text']}" for x in findings]


def render(rep):
    out = []
    img = rep["image"]
    if img is None:
        out.append("image: none (pass --image IMAGE or load an image module)")
    else:
        out.append(f"image: {img['path']} ({img['kind']}, from {img['source']})")
    out.append(f"site configuration: {rep['site_config'] or 'none (HPCIMAGE_SITE_CONFIG unset)'}")
    out += ["", "Launcher"] + _lines(rep["launcher"]["findings"])
    out += ["", "Host MPI (bind model)"] + _lines(rep["host_mpi"]["findings"])
    out += ["", "Image MPI (hybrid model)"]
    if img is None:
        out.append("  no    no image given")
    else:
        out += _lines(img["findings"])
    out += ["", "Ranks on a node"] + _lines(rep["ranks"]["findings"])
    out += ["", "Modes"]
    for name in ("hybrid", "bind"):
        v = rep["modes"][name]
        out.append(f"  {'ok' if v['works'] else 'no':<5} {name}: {v['reason']}")
        out += ["    " + line.lstrip() for line in _lines(v["findings"])]
    out.append(f"  info  default mode: {rep['default_mode']} (image-mpi --mpi-mode overrides it)")
    out.append("")
    if rep["works"]:
        out.append("result: " + " and ".join(rep["works"]) + (" work" if len(rep["works"]) > 1
                                                             else " works"))
    else:
        out.append("result: no MPI mode works here")
    return "\n".join(out) + "\n"


def run(image=None, as_json=False, environ=None):
    rep = diagnose(image, environ)
    if as_json:
        text = json.dumps(rep, indent=2) + "\n"
    else:
        text = render(rep)
    sys.stdout.write(text)
    sys.stdout.flush()
    return 0 if rep["works"] else 1

