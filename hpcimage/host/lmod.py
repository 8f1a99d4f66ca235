"""Lmod inside the container (site key `lmod_in_image`): the host's Lmod, the Lua it
runs on and the site's MODULEPATH, so that `module load` works in the image.

Everything is bound read-only at the host's own paths, so that the paths Lmod was
configured with (in libexec/lmod, init/*) and the paths in MODULEPATH and in loaded
modules' state stay true inside:

    the Lmod tree        realpath of the prefix, and the prefix itself when it is a
                         symlink (Debian: /usr/share/lmod/lmod -> 8.6.19), the path
                         init/sh names as LMOD_PKG, and what symlinks in the tree point
                         to outside it (Debian: lib -> /usr/lib/lmod/8.6.19/lib)
    the Lua interpreter  named by libexec/lmod's `#!` (its path and its realpath)
    Lua module dirs      sys_lua_path / sys_lua_cpath compiled into libexec/lmod
                         (Debian: /usr/share/lua/5.3, /usr/lib/x86_64-linux-gnu/lua/5.3)
    libraries            the dependency closure of the interpreter, the Lua C modules
                         and Lmod's own (tcl2lua.so), from the host's ld.so.cache, into
                         /.singularity.d/libs (on LD_LIBRARY_PATH), never libc & friends
    /etc/lmod            when present (modulespath, lmod_config.lua, ...)
    MODULEPATH           the host's $MODULEPATH entries that exist, and the site's
                         generated modulefiles root (site.json "lmod": "modulepath")

and the environment names that Lmod: LMOD_PKG, LMOD_DIR, LMOD_CMD, MODULESHOME,
BASH_ENV (init/bash: `module` in every non-interactive bash) and ENV (init/sh: in
interactive POSIX shells). image-shell's interactive bash reads init/bash as its rc file.

Pure: reads the host through a HostRoot, returns a Contribution; runs nothing.
Imported only when the site switches it on (not on the plain image-exec path).
"""
import os

from hpcimage.host.root import NEVER_BIND, Contribution, HostRoot

DEFAULT_PREFIX = "/usr/share/lmod/lmod"
from hpcimage.host.root import LIBS_DIR  # noqa: E402
TAG = "lmod_in_image"
# Variables that pass into the container even under --cleanenv (Lmod's configuration
# and the module search path; not its state: _ModuleTable*_ describes modules whose
# variables --cleanenv dropped).
CLEANENV_KEEP_PREFIXES = ("MODULEPATH", "LMOD_", "MODULESHOME")
WHY_TREE = "Lmod inside (lmod_in_image)"
WHY_LUA = "Lua for Lmod (lmod_in_image)"
WHY_LIB = "library of Lmod's Lua (lmod_in_image)"
WHY_MP = "MODULEPATH (lmod_in_image)"


def candidates(prefix, environ):
    """[(prefix, where it came from)] in the order they are tried; prefix: site.yaml
    lmod_prefix (None: look for it)."""
    out = []
    if prefix:
        return [(prefix, "site.yaml lmod_prefix")]
    if environ.get("LMOD_PKG"):
        out.append((environ["LMOD_PKG"], "$LMOD_PKG"))
    if environ.get("LMOD_DIR"):
        out.append((os.path.dirname(environ["LMOD_DIR"].rstrip("/")), "$LMOD_DIR/.."))
    if environ.get("LMOD_CMD"):
        out.append((os.path.dirname(os.path.dirname(environ["LMOD_CMD"])), "$LMOD_CMD/../.."))
    out.append((DEFAULT_PREFIX, "the default"))
    return [(os.path.normpath(p), w) for p, w in out if p.startswith("/")]


def find_prefix(host, site_prefix, environ):
    """(prefix, None) of the host's Lmod, or (None, why not); site_prefix: site.yaml
    lmod_prefix (None: look for it)."""
    tried = []
    for prefix, where in candidates(site_prefix, environ):
        if host.isfile(prefix + "/libexec/lmod"):
            return prefix, None
        tried.append(f"{prefix} ({where})")
    return None, "no Lmod on this host (no libexec/lmod in " + ", ".join(tried) + ")"


def shebang(host, path):
    """The interpreter and its argument from the first line of a script, or (None, None)."""
    try:
        line = host.read_bytes(path, 256).split(b"\n", 1)[0]
    except OSError:
        return None, None
    if not line.startswith(b"#!"):
        return None, None
    parts = os.fsdecode(line[2:]).split(None, 1)
    if not parts:
        return None, None
    return parts[0], (parts[1].strip() if len(parts) > 1 else None)


def _quoted_after(text, marker):
    """The "..." string after marker in text (a Lua or sh assignment), or None."""
    k = text.find(marker)
    if k < 0:
        return None
    rest = text[k + len(marker):].lstrip(" =\t")
    if not rest.startswith('"'):
        return None
    end = rest.find('"', 1)
    return rest[1:end] if end > 0 else None


def template_dirs(spec):
    """Directories of a Lua search path ("/a/?.lua;/b/?/init.lua;;./?.lua")."""
    out = []
    for t in (spec or "").split(";"):
        if not t.startswith("/"):
            continue
        d = t[:t.index("?")] if "?" in t else os.path.dirname(t)
        d = os.path.normpath(d.rstrip("/") or "/")
        while "?" in d:
            d = os.path.dirname(d)
        if d != "/" and d not in out:
            out.append(d)
    return out


def lua_dirs(lmod_text, version, environ):
    """(Lua module dirs, C module dirs) that libexec/lmod searches."""
    paths, cpaths = [], []
    for var, acc in (("sys_lua_path", paths), ("sys_lua_cpath", cpaths)):
        spec = _quoted_after(lmod_text, "local " + var)
        if spec and not spec.startswith("@"):
            acc.extend(template_dirs(spec))
    if version and not (paths and cpaths):       # Lmod configured to use Lua's defaults
        for d in (f"/usr/local/share/lua/{version}", f"/usr/share/lua/{version}"):
            paths.append(d)
        for d in (f"/usr/local/lib/lua/{version}", f"/usr/lib/lua/{version}",
                  f"/usr/lib64/lua/{version}"):
            cpaths.append(d)
    suffix = "_" + version.replace(".", "_") if version else ""
    for var, acc in (("LUA_PATH", paths), ("LUA_CPATH", cpaths)):
        value = environ.get(var + suffix) if suffix else None
        acc.extend(d for d in template_dirs(value or environ.get(var)) if d not in acc)
    return paths, cpaths


def _lua_version(interp, real):
    """"5.3" from the interpreter's name (lua5.3, lua-5.4) or its LUA_PATH_5_3 string."""
    import re
    m = re.search(r"lua-?(5\.\d)", os.path.basename(interp))
    if m:
        return m.group(1)
    try:
        with open(real, "rb") as f:
            m = re.search(rb"LUA_PATH_5_(\d)", f.read(4 << 20))
    except OSError:
        return None
    return f"5.{m.group(1).decode()}" if m else None


def _outside_links(host, real_top, depth=4, out=None):
    """Host paths (resolved) that symlinks in the tree point to outside it (Debian:
    lua/5.3/posix.so -> ../../liblua5.3-posix.so.1.0.0, lmod/8.6.19/lib -> ...)."""
    out = [] if out is None else out

    def walk(d, level):
        for name in host.listdir(d):
            p = d + "/" + name
            if host.islink(p):
                try:
                    r = host.resolve(p)
                except OSError:
                    continue
                if not _under(r, real_top) and host.exists(r):
                    r = _sibling(r, real_top)
                    if not any(_under(r, o) for o in out):
                        out[:] = [o for o in out if not _under(o, r)] + [r]
            elif level < depth and host.isdir(p):
                walk(p, level + 1)
    walk(real_top, 1)
    return out


def _sibling(target, real_top):
    """A link target in a sibling tree of real_top is taken as that whole tree
    (/usr/share/lua/5.3/json.lua -> ../5.1/json.lua: /usr/share/lua/5.1), so that one
    bind serves every link into it; any other target is taken as it is."""
    parent = os.path.dirname(real_top)
    if _under(target, parent) and target != parent:
        return parent.rstrip("/") + "/" + target[len(parent):].lstrip("/").split("/")[0]
    return target


def _under(path, top):
    return path == top or path.startswith(top.rstrip("/") + "/")


def _elf_files(host, paths, limit=2000):
    """Real paths of the shared objects (*.so*) at or below paths (host paths)."""
    out = []
    for d in paths:
        if ".so" in os.path.basename(d) and host.isfile(d):
            out.append(host.realpath(d))
            continue
        for top, _sub, files in os.walk(host.realpath(d)):
            for f in files:
                if ".so" in f:
                    p = os.path.join(top, f)
                    if not os.path.islink(p) and p not in out:
                        out.append(p)
                        if len(out) >= limit:
                            return out
    return out


def discover(policy, environ, site_dir=None, host=None):
    """The Contribution of Lmod inside for one launch.

    policy: site.json's "lmod" (config.policy.LmodInImage: prefix, modulepath);
    environ: the caller's environment; site_dir: the directory of site.json (the
    relative "modulepath" entries are relative to it)."""
    host = host or HostRoot(environ=environ)
    c = Contribution()
    c.skip_covered = True       # a MODULEPATH entry in $HOME or /tmp is bound rw already
    prefix, problem = find_prefix(host, policy.prefix, environ)
    if prefix is None:
        c.warnings.append(f"{TAG}: {problem}: `module` is not available in the image")
        return c
    lmod_cmd = prefix + "/libexec/lmod"
    interp, arg = shebang(host, lmod_cmd)
    if interp is None:
        c.warnings.append(f"{TAG}: {lmod_cmd} has no #! line: `module` is not available "
                          "in the image")
        return c
    if os.path.basename(interp) == "env" and arg:
        dirs = [d for d in (environ.get("PATH") or "").split(":") if d.startswith("/")]
        found = host.which(arg.split()[0], dirs + ["/usr/local/bin", "/usr/bin", "/bin"])
        interp = found or interp + " " + arg
    if not (interp.startswith("/") and host.isfile(interp)):
        c.warnings.append(f"{TAG}: {lmod_cmd} runs on {interp}, which this host lacks: "
                          "`module` is not available in the image")
        return c

    # The Lmod tree, at its real path and at the paths that name it.
    real = host.resolve(prefix)
    c.bind(host.path(real), real, True, WHY_TREE)
    try:
        init_sh = host.read_text(prefix + "/init/sh", 64 << 10)
    except OSError:
        init_sh = ""
    for p in (prefix, _quoted_after(init_sh, "LMOD_PKG")):
        if p and p.startswith("/"):
            p = os.path.normpath(p)
            if p != real and host.resolve(p) == real:
                c.bind(host.path(real), p, True, WHY_TREE)
    outside = _outside_links(host, real)
    for r in outside:
        c.bind(host.path(r), r, True, WHY_TREE + ": linked from the tree")

    # Its Lua: the interpreter, the module directories, the libraries.
    ireal = host.resolve(interp)
    for p in dict.fromkeys((ireal, os.path.normpath(interp))):
        c.bind(host.path(ireal), p, True, WHY_LUA + f": {os.path.basename(lmod_cmd)}'s #!")
    try:
        text = host.read_text(lmod_cmd, 64 << 10)
    except OSError:
        text = ""
    paths, cpaths = lua_dirs(text, _lua_version(interp, host.path(ireal)), environ)
    lua_outside = []
    for d in dict.fromkeys(paths + cpaths):
        if host.isdir(d) and not _under(host.resolve(d), real):
            rd = host.resolve(d)
            c.bind(host.path(rd), d, True, WHY_LUA + ": modules")
            _outside_links(host, rd, out=lua_outside)
    for r in lua_outside:
        if not any(_under(r, b[1]) for b in c.binds):
            c.bind(host.path(r), r, True, WHY_LUA + ": linked from its module dirs")
    _bind_closure(host, c, [host.path(ireal)] + _elf_files(
        host, [d for d in cpaths if host.isdir(d)] + [real] + outside + lua_outside))

    if host.isdir("/etc/lmod"):
        c.bind(host.path(host.resolve("/etc/lmod")), "/etc/lmod", True, WHY_TREE + ": /etc/lmod")

    # The module search path: the host's, and the site's generated modulefiles.
    dirs = [d for d in (environ.get("MODULEPATH") or "").split(":") if d.startswith("/")]
    for d in policy.modulepath:
        if isinstance(d, str) and d:
            if not d.startswith("/"):
                if not site_dir:
                    continue
                d = os.path.join(site_dir, d)
            dirs.append(d)
    for d in dict.fromkeys(os.path.normpath(x) for x in dirs):
        if any(_under(d, b[1]) for b in c.binds):
            continue                    # inside the Lmod tree (its modulefiles/Core)
        if host.isdir(d):
            c.bind(host.path(host.resolve(d)), d, True, WHY_MP)
        else:
            c.notes.append(f"{TAG}: MODULEPATH entry {d} is not a directory here; skipped")

    c.env.update({
        "LMOD_PKG": prefix,
        "LMOD_DIR": prefix + "/libexec",
        "LMOD_CMD": lmod_cmd,
        "MODULESHOME": prefix,
        "BASH_ENV": prefix + "/init/bash",
        "ENV": prefix + "/init/sh",
    })
    c.notes.append(f"{TAG}: Lmod {prefix} on {interp}")
    return c


def _bind_closure(host, c, objects):
    """Bind the host libraries that objects need (by soname, from ld.so.cache, closed
    under their own needs) into LIBS_DIR; libc & friends stay the image's."""
    from hpcimage.host import elf
    from hpcimage.host.ldcache import LdCache
    cache = LdCache(host)
    seen, missing, todo = set(), [], []

    def needs(path):
        try:
            names = elf.info(path).needed
        except (OSError, ValueError):
            return
        for n in names:
            if n in seen or n.startswith(NEVER_BIND):
                continue
            seen.add(n)
            lib = cache.find(n)
            if lib:
                todo.append((n, lib))
            elif n not in missing:
                missing.append(n)
    for o in objects:
        needs(o)
    bound = False
    while todo:
        name, lib = todo.pop(0)
        bound |= c.bind(lib, f"{LIBS_DIR}/{name}", True, WHY_LIB)
        needs(lib)
    if missing:
        c.notes.append(f"{TAG}: libraries of Lmod's Lua not in the host's ld.so.cache: "
                       + ", ".join(missing))
    if bound:
        c.add_prepend("LD_LIBRARY_PATH", LIBS_DIR)
