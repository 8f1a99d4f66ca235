"""`hpcimage build OUT DEF`: a definition file -> SIF, SquashFS or sandbox, unprivileged.

Order of one stage (as Apptainer's): bootstrap agent -> base layout -> %setup (on the
host, $HPCIMAGE_ROOTFS) -> %files (host, or `from STAGE`) -> %appfiles -> %post, then
each %appinstall (chrooted, /bin/sh -ex) -> /.singularity.d metadata (%environment,
%runscript, %startscript, %test, %help, %labels, apps) -> %test (last stage only, the
tree read-only; --notest skips it). The last stage's tree becomes OUT.

Everything that touches the tree runs in one forked process that is root of a user
namespace (hpcimage.imagebuild.userns: subordinate ids when newuidmap and /etc/subuid allow,
else one id). The trees live in a temporary directory (beside OUT for --sandbox, else
under $HPCIMAGE_TMPDIR, $APPTAINER_TMPDIR, $TMPDIR or /tmp), removed from inside the
namespace whatever happens; OUT is written under a temporary name and renamed into
place (hpcimage.imagebuild.convert), so a failed build leaves nothing.
"""
import os
import sys
import tempfile
import time

from hpcimage.imagebuild import convert, deffile
from hpcimage.errors import HpcimageError, UsageError
from hpcimage.imagebuild import userns
from hpcimage.runtime.environ import DEFAULT_PATH
from hpcimage.linux.paths import resolve_in
from hpcimage.imagebuild.layout import (write_file, unlink_missing_ok, has_sh, base_layout, app_layout,
                                         write_metadata, remove_tree)

SOURCE_ENV = ('for __f in /.singularity.d/env/*.sh; do [ -f "$__f" ] && . "$__f"; done; '
              'unset __f; exec "$@"')
UNSUPPORTED = {"yum": "yum/dnf/zypper bootstraps are not supported yet: start from "
                      "'Bootstrap: docker' (e.g. From: rockylinux:8) instead",
               "library": "the Sylabs library is not supported: use docker:// or oras://",
               "shub": "Singularity Hub is gone: use docker:// or oras://",
               "docker-daemon": "docker-daemon needs a Docker daemon: `docker save` the "
                                "image and use 'Bootstrap: docker-archive'",
               "buildkit": "buildkit is not supported: build with Docker, then "
                           "'Bootstrap: docker-archive'",
               "arch": "Arch Linux bootstrap (pacstrap) is not supported yet"}
UNSUPPORTED["dnf"] = UNSUPPORTED["zypper"] = UNSUPPORTED["yum"]
PASS_ENV = ("TERM", "http_proxy", "https_proxy", "no_proxy", "HTTP_PROXY", "HTTPS_PROXY",
            "NO_PROXY", "ftp_proxy")


VERBOSE = False     # hpcimage build -v: the agents' own output too


def _say(msg):
    print(f"hpcimage: build: {msg}", file=sys.stderr, flush=True)


def build(out, definition, *, sandbox=False, force=False, notest=False, build_args=None,
          tmpdir=None, comp=convert.DEFAULT_COMP, idmap=None, text=None,
          warn_unused_build_args=False):
    """Build OUT from the definition file DEFINITION (or from TEXT, a definition named
    DEFINITION in messages); returns OUT's kind. A --build-arg no stage uses is an
    error unless WARN_UNUSED_BUILD_ARGS (as Apptainer's)."""
    if text is not None:
        d = deffile.parse(text, str(definition), build_args, warn_unused_build_args)
    else:
        d = deffile.load(definition, build_args, warn_unused=warn_unused_build_args)
    deffile.check(d)
    out = os.path.abspath(os.fspath(out).rstrip("/") or "/")
    kind = convert.output_kind(out, sandbox)
    convert.check_out(out, force)
    for st in d.stages:
        agent = st.bootstrap
        if agent in UNSUPPORTED:
            raise UsageError(f"{d.path}:{st.header_lines['bootstrap']}: Bootstrap: {agent}: "
                             f"{UNSUPPORTED[agent]}")
    cwd = os.getcwd()
    _check_host_files(d, cwd)
    if tmpdir is None:
        tmpdir = (os.path.dirname(out) if kind == "sandbox" else
                  os.environ.get("HPCIMAGE_TMPDIR") or os.environ.get("APPTAINER_TMPDIR")
                  or tempfile.gettempdir())
    if not os.path.isdir(tmpdir):
        raise UsageError(f"temporary directory {tmpdir} does not exist")
    m = idmap or userns.IdMap.choose()
    _say(f"{d.path} -> {out} ({kind}); ids: {m.describe()}")
    job = _Job(d, out, kind, force, notest, cwd, tmpdir, comp, m.mode)
    t = time.monotonic()
    try:
        userns.run_as_root(job.run, (), m)
    except HpcimageError as e:
        if "build process died" in e.message and os.path.lexists(job.work):
            # killed before it could clean up: remove its tree (subordinate ids own
            # parts of it) from a namespace of the same map
            try:
                userns.run_as_root(remove_tree, (job.work,), m)
            except HpcimageError:
                pass
        raise
    _say(f"built {out} in {time.monotonic() - t:.1f} s")
    return kind


def _check_host_files(d, cwd):
    for st in d.stages:
        for frm, entries, _ in st.files:
            if frm is not None:
                continue
            for e in entries:
                import glob
                p = os.path.join(cwd, e.src)
                if not glob.glob(p) and not os.path.lexists(p):
                    raise UsageError(f"{d.path}:{e.line}: %files: {e.src}: no such file "
                                     f"(relative to the current directory {cwd})")


class _Job:
    """The build, run inside the namespace (fork: the objects are shared)."""

    def __init__(self, d, out, kind, force, notest, cwd, tmpdir, comp, mode):
        self.d, self.out, self.kind, self.force, self.notest = d, out, kind, force, notest
        self.cwd, self.tmpdir, self.comp, self.mode = cwd, tmpdir, comp, mode
        self.roots = {}
        self.verbose = VERBOSE
        self.testing = None         # (%test section, its process) while it runs
        self.work = os.path.join(tmpdir, f".{os.path.basename(out)}.build-{os.getpid()}-"
                                 f"{os.urandom(4).hex()}")

    def run(self):
        os.mkdir(self.work, 0o700)
        try:
            for st in self.d.stages:
                root = os.path.join(self.work, f"stage{st.index}")
                self.stage(st, root, last=st is self.d.final)
                self.roots[st.index] = root
            final = self.roots[self.d.final.index]
            if self.kind == "sandbox":
                tmp = convert.temp_beside(self.out)
                os.rename(final, tmp)
                try:
                    os.chmod(tmp, 0o755)
                    convert.install(tmp, self.out, self.force)
                except BaseException:
                    remove_tree(tmp)
                    raise
            else:
                _say(f"writing {self.kind} image {self.out}")
                convert.build(self.out, convert.Source("dir", final), force=self.force,
                              comp=self.comp, before_install=self.test_result)
                os.chmod(self.out, 0o644)
        finally:
            if self.testing is not None:            # mksquashfs failed: stop %test
                self.testing[1].kill()
            remove_tree(self.work)
        return self.kind

    # ------------------------------------------------------------------ a stage
    def stage(self, st, root, last):
        d = self.d
        label = f"stage {st.name or st.index + 1}" if len(d.stages) > 1 else "image"
        _say(f"{label}: Bootstrap: {st.bootstrap}" + (f", From: {st.get('from')}"
                                                       if st.get("from") else ""))
        from hpcimage.imagebuild import agents
        self.host_script(st, "pre", None)
        agents.bootstrap(st, root, self)
        base_layout(root)
        self.host_script(st, "setup", root)
        self.copy_files(st, root)
        for app in st.apps.values():
            app_layout(root, app)
            for e in app.files:
                self.copy(e, os.path.join(self.cwd, e.src), "/scif/apps/" + app.name +
                          "/" + (e.dst or os.path.basename(e.src)).lstrip("/"),
                          root, None, f"%appfiles {app.name}")
        self.post(st, root)
        write_metadata(st, root, d)
        if last and not self.notest:
            self.test(st, root)

    def _fail(self, line, what, rc):
        how = f"killed by signal {rc - 128}" if rc > 128 else f"exit {rc}"
        return HpcimageError(f"{self.d.path}:{line}: {what} failed ({how})")

    def host_script(self, st, name, root):
        """%pre (before the bootstrap agent, ROOT None) or %setup on the host."""
        sec = st.sections.get(name)
        if not sec:
            return
        _say(f"running %{name} on the host")
        script = os.path.join(self.work, f"{name}-{st.index}.sh")
        write_file(script, sec.body, 0o700)
        env = dict(os.environ)
        if root is not None:
            for k in ("HPCIMAGE_ROOTFS", "APPTAINER_ROOTFS", "SINGULARITY_ROOTFS"):
                env[k] = root
        env["APPTAINER_ENVIRONMENT"] = env["SINGULARITY_ENVIRONMENT"] = \
            "/.singularity.d/env/91-environment.sh"
        rc = userns.run_on_host(deffile.script_argv(sec, script), env, cwd=self.cwd,
                                what=f"%{name}")
        os.unlink(script)
        if rc:
            raise self._fail(sec.line, f"%{name}", rc)

    def copy_files(self, st, root):
        for frm, entries, line in st.files:
            if frm is not None:
                src_root = self.roots[self.d.stage_named(frm).index]
                where = f"%files from {frm}"
            else:
                src_root, where = None, "%files"
            for e in entries:
                self.copy(e, e.src, e.dst or e.src, root, src_root, where)

    def copy(self, e, src, dst, root, src_root, where):
        """SRC copied to ROOT/DST; a glob may match several sources. From the host (SRC
        relative to the current directory): cp -fLr, as Apptainer. From a stage's tree
        SRC_ROOT: every link on SRC's path is followed inside SRC_ROOT (an absolute one
        from SRC_ROOT's top), never on the build host, and links inside a copied
        directory are copied as links (cp -fPr)."""
        import glob
        if src_root is None:
            pattern = os.path.join(self.cwd, src)
            matches = sorted(glob.glob(pattern)) or ([pattern] if os.path.lexists(pattern) else [])
            flags = "-fLr"
        else:
            matches = [os.path.join(src_root, rel) for rel in glob_in(src_root, src)]
            flags = "-fPr"
        if not matches:
            raise UsageError(f"{self.d.path}:{e.line}: {where}: {src}: no such file")
        if not dst.startswith("/"):
            dst = "/" + dst
        rel = resolve_in(root, dst)
        target = os.path.join(root, rel)
        if len(matches) > 1 or dst.endswith("/"):
            os.makedirs(target, exist_ok=True)
        else:
            os.makedirs(os.path.dirname(target), exist_ok=True)
        import subprocess
        r = subprocess.run(["cp", flags, "--", *matches, target], capture_output=True,
                           text=True)
        if r.returncode:
            msg = (r.stderr.strip().splitlines() or ["?"])[-1]
            raise HpcimageError(f"{self.d.path}:{e.line}: {where}: {msg}")

    def post(self, st, root):
        sec = st.sections.get("post")
        installs = [a for a in st.apps.values() if a.script("install") is not None]
        if not sec and not installs:
            return
        if not has_sh(root):
            raise HpcimageError(f"{self.d.path}:{(sec or installs[0].sections['install']).line}: "
                                "the image has no /bin/sh to run %post")
        body = sec.body if sec else ""
        for a in installs:
            body += (f"\ncd /\n. /scif/apps/{a.name}/scif/env/01-base.sh\n"
                     f"cd /scif/apps/{a.name}\n{a.script('install')}\ncd /\n")
        script = os.path.join(root, ".post.script")
        write_file(script, body, 0o755)
        sandbox_conf = None
        if self.mode == "single" and os.path.isdir(os.path.join(root, "etc/apt/apt.conf.d")):
            sandbox_conf = os.path.join(root, "etc/apt/apt.conf.d/00hpcimage-build")
            if os.path.lexists(sandbox_conf):
                sandbox_conf = None
            else:
                write_file(sandbox_conf, '// hpcimage build with one mapped id (removed after %post)\n'
                       'APT::Sandbox::User "root";\n')
        _say("running %post" + (" and %appinstall" if installs else "") + " in the image")
        try:
            rc = userns.run_in_root(root, ["/bin/sh", "-c", SOURCE_ENV, "post"] +
                                    deffile.script_argv(sec, "/.post.script"),
                                    self.script_env(), what="%post")
        finally:
            unlink_missing_ok(script)
            if sandbox_conf:
                unlink_missing_ok(sandbox_conf)
        if rc:
            line = sec.line if sec else installs[0].sections["install"].line
            raise self._fail(line, "%post" if sec else "%appinstall", rc)
        labels_file = os.path.join(root, ".build.labels")
        if os.path.isfile(labels_file) and not os.path.islink(labels_file):
            with open(labels_file, errors="replace") as f:
                st.labels.update(deffile._labels(f.read().splitlines(), 1, ".build.labels"))
        unlink_missing_ok(labels_file)

    def script_env(self):
        env = {"PATH": DEFAULT_PATH, "HOME": "/root", "LANG": "C", "USER": "root",
               "LOGNAME": "root"}
        for k in PASS_ENV:
            if k in os.environ:
                env[k] = os.environ[k]
        for p in ("APPTAINER", "SINGULARITY", "HPCIMAGE"):
            env[p + "_ENVIRONMENT"] = "/.singularity.d/env/91-environment.sh"
            env[p + "_LABELS"] = "/.build.labels"
        return env

    def test(self, st, root):
        """Start %test in the finished (read-only) tree. An image file's %test runs
        while mksquashfs reads the same tree, and its result decides, before the
        rename, whether the image appears (test_result); a sandbox waits for it here."""
        sec = st.sections.get("test")
        if not sec:
            return
        if not has_sh(root):
            raise HpcimageError(f"{self.d.path}:{sec.line}: the image has no /bin/sh to run %test")
        _say("running %test (skip with --notest)")
        child = userns.start_in_root(root, ["/bin/sh", "-c", SOURCE_ENV, "test",
                                            "/.singularity.d/test"], self.script_env(),
                                     readonly=True, what="%test")
        self.testing = (sec, child)
        if self.kind == "sandbox":
            self.test_result()

    def test_result(self):
        """Wait for %test; raise when it failed."""
        if self.testing is None:
            return
        sec, child = self.testing
        try:
            rc = child.wait()
        finally:
            self.testing = None
        if rc:
            raise self._fail(sec.line, "%test", rc)


def glob_in(root, pattern):
    """PATTERN's matches inside ROOT with chroot semantics: each component's links
    followed within ROOT (resolve_in), wildcards matched in the directory so reached;
    the matches relative to ROOT, fully resolved, sorted. A pattern without wildcards
    gives its resolved path when it exists."""
    import fnmatch
    import glob
    found = [""]
    for comp in [c for c in pattern.split("/") if c and c != "."]:
        nxt = []
        for base in found:
            if glob.has_magic(comp):
                d = os.path.join(root, base)
                try:
                    names = sorted(os.listdir(d)) if os.path.isdir(d) else []
                except OSError:
                    names = []
                hidden = comp.startswith(".")
                for n in names:
                    if (hidden or not n.startswith(".")) and fnmatch.fnmatchcase(n, comp):
                        nxt.append(resolve_in(root, base + "/" + n))
            else:
                nxt.append(resolve_in(root, base + "/" + comp))
        found = nxt
    return sorted({r for r in found if os.path.lexists(os.path.join(root, r))})


# ------------------------------------------------------------- the site's images

def definition_for(site_dir, image):
    """images/<Name>-<version>.def, else images/<Name>.def, beside site.yaml."""
    for name in (f"{image.name}-{image.version}.def", f"{image.name}.def"):
        p = os.path.join(site_dir, "images", name)
        if os.path.isfile(p):
            return p
    return None


BUILD_DIR = ".hpcimage-build."     # STOREDIR/.hpcimage-build.PID.RANDOM: a build in progress


def _clean_build_dirs(directory):
    """Remove the build directories of `build --all` runs that died (their PID is gone)."""
    import shutil
    from hpcimage.store import layout as store
    try:
        names = os.listdir(directory)
    except OSError:
        return
    for n in names:
        if not n.startswith(BUILD_DIR):
            continue
        pid = n[len(BUILD_DIR):].split(".")[0]
        if pid.isdigit() and not store._pid_alive(int(pid)):
            shutil.rmtree(os.path.join(directory, n), ignore_errors=True)


def build_site(site_path, force=False, notest=False, only=()):
    """`hpcimage build --all`: build every image of SITE_PATH that has a definition file
    and publish it into the store (hpcimage.store.publish: manifest, previous versions,
    atomic). Each image is built in a temporary directory beside its store file, never
    at the store's path, then published from there. ONLY names modules (Name or
    Name/version) of site.yaml; a name it lacks is bad input (exit 2) before anything is
    built. Returns the modules (built, skipped, failed)."""
    import shutil
    import tempfile
    from hpcimage.config import site as _site
    from hpcimage.store import layout as store_layout
    from hpcimage.store.publish import publish
    s = _site.load(site_path)
    known = {i.module for i in s.images} | {i.name for i in s.images}
    unknown = [n for n in only if n not in known]
    if unknown:
        listed = ", ".join(i.module for i in s.images) or "none"
        raise UsageError(f"build --all: {', '.join(unknown)}: not an image of {s.path} "
                         f"(its images: {listed})")
    built, skipped, failed = [], [], []
    for img in s.images:
        if only and img.module not in only and img.name not in only:
            continue
        d = definition_for(s.base_dir, img)
        if d is None:
            _say(f"{img.module}: no images/{img.name}-{img.version}.def: skipped")
            skipped.append(img.module)
            continue
        if os.path.exists(img.path) and not force:
            _say(f"{img.module}: {img.path} exists (--force rebuilds it)")
            skipped.append(img.module)
            continue
        directory = os.path.dirname(img.path)
        work = None
        try:
            store_layout.makedirs(directory)
            _clean_build_dirs(directory)
            try:
                work = tempfile.mkdtemp(prefix=f"{BUILD_DIR}{os.getpid()}.", dir=directory)
            except OSError as e:
                raise HpcimageError(f"cannot create a build directory in {directory}: "
                                    f"{e.strerror}") from None
            out = os.path.join(work, os.path.basename(img.path))
            build(out, d, notest=notest)
            publish(site_path, out, img.name, img.version, definition=d,
                    out=sys.stderr)
            built.append(img.module)
        except HpcimageError as e:
            print(f"hpcimage: error: {img.module}: {e.message}", file=sys.stderr)
            failed.append(img.module)
        finally:
            if work is not None:
                shutil.rmtree(work, ignore_errors=True)
    return built, skipped, failed
