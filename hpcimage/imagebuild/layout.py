"""The layout of a built image: Apptainer's base environment, SCI-F apps, the
metadata under /.singularity.d, and removing a tree."""
import json
import os
import shutil
import stat
import time

from hpcimage.image.baseenv import ACTIONS, ENV_FILES, ENVIRONMENT_HEAD
from hpcimage.linux.paths import resolve_in
from hpcimage.imagebuild.deffile import shebang_script

META = ".singularity.d"


def write_file(path, text, mode=0o644):
    if os.path.islink(path):
        os.unlink(path)
    with open(path, "w", errors="surrogateescape") as f:
        f.write(text)
    os.chmod(path, mode)


def unlink_missing_ok(path):
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def has_sh(root):
    rel = resolve_in(root, "/bin/sh")
    p = os.path.join(root, rel)
    return os.path.isfile(p) or os.path.isfile(os.path.realpath(p)) and \
        os.path.realpath(p).startswith(root)




def base_layout(root):
    """What every image has (Apptainer's base environment): the mount points, /tmp,
    /etc/hosts and /etc/resolv.conf, /.singularity.d with env/ (01-base.sh,
    90-environment.sh, 95-apps.sh, 99-base.sh), actions/ (exec, run, shell, start,
    test) and libs/, and the links /singularity, /environment, /.exec, /.run, /.shell,
    /.test."""
    def mkdir(rel, mode=0o755):
        p = os.path.join(root, resolve_in(root, rel))
        if not os.path.lexists(p):
            os.makedirs(p, exist_ok=True)
            os.chmod(p, mode)
    os.makedirs(root, exist_ok=True)
    for d in ("proc", "sys", "dev", "home", "etc", "var", "mnt", "opt", "srv"):
        mkdir(d)
    mkdir("root", 0o700)
    mkdir("tmp", 0o1777)
    mkdir("var/tmp", 0o1777)
    for f in ("etc/hosts", "etc/resolv.conf"):
        p = os.path.join(root, resolve_in(root, f))
        if not os.path.lexists(p):
            write_file(p, "")
    for f, text in (("etc/passwd", "root:x:0:0:root:/root:/bin/sh\n"),
                    ("etc/group", "root:x:0:\n")):
        p = os.path.join(root, resolve_in(root, f))
        if not os.path.lexists(p):
            write_file(p, text)
    for d in (META, META + "/env", META + "/actions", META + "/libs"):
        mkdir(d)
    meta = os.path.join(root, resolve_in(root, META))
    for name, text in ACTIONS.items():
        write_file(os.path.join(meta, "actions", name), text, 0o755)
    for name, text in ENV_FILES.items():
        write_file(os.path.join(meta, "env", name), text, 0o755)
    env90 = os.path.join(meta, "env", "90-environment.sh")
    if not os.path.lexists(env90):
        write_file(env90, ENVIRONMENT_HEAD, 0o755)
    for name, target in (("singularity", META + "/runscript"),
                         ("environment", META + "/env/90-environment.sh"),
                         (".exec", META + "/actions/exec"), (".run", META + "/actions/run"),
                         (".shell", META + "/actions/shell"), (".test", META + "/actions/test")):
        p = os.path.join(root, name)
        if not os.path.lexists(p):
            os.symlink(target, p)


def app_layout(root, app):
    """/scif/apps/NAME/{bin,lib,scif/env}, /scif/data/NAME/{input,output} and the app's
    metadata files, as Apptainer lays them out."""
    n = app.name
    base = os.path.join(root, "scif/apps", n)
    for d in ("bin", "lib", "scif/env"):
        os.makedirs(os.path.join(base, d), exist_ok=True)
    for d in ("input", "output"):
        os.makedirs(os.path.join(root, "scif/data", n, d), exist_ok=True)
    meta = os.path.join(base, "scif")
    write_file(os.path.join(meta, "env/01-base.sh"),
           f"#!/bin/sh\n\nSCIF_APPNAME={n}\nSCIF_APPROOT=\"/scif/apps/{n}\"\n"
           f"SCIF_APPMETA=\"/scif/apps/{n}/scif\"\nSCIF_DATA=\"/scif/data\"\n"
           f"SCIF_APPDATA=\"/scif/data/{n}\"\nSCIF_APPINPUT=\"/scif/data/{n}/input\"\n"
           f"SCIF_APPOUTPUT=\"/scif/data/{n}/output\"\nexport SCIF_APPDATA SCIF_APPNAME "
           "SCIF_APPROOT SCIF_APPMETA SCIF_APPINPUT SCIF_APPOUTPUT SCIF_DATA\n", 0o755)
    if app.script("env") is not None:
        write_file(os.path.join(meta, "env/90-environment.sh"), app.script("env"), 0o755)
    for short, name in (("run", "runscript"), ("test", "test"), ("start", "startscript")):
        if short in app.sections:       # %apprun, %apptest, %appstart (for instances)
            write_file(os.path.join(meta, name), shebang_script(app.sections[short]), 0o755)
    if app.script("help") is not None:
        write_file(os.path.join(meta, "runscript.help"), app.script("help"))
    labels = {"SCIF_APP_NAME": n}
    labels.update(app.labels)
    write_file(os.path.join(meta, "labels.json"), json.dumps(labels, indent=1) + "\n")


def read_json(path):
    if not os.path.exists(path):
        return {}
    try:
        with open(path) as f:
            v = json.load(f)
        return v if isinstance(v, dict) else {}
    except (OSError, ValueError):
        return {}


def write_metadata(st, root, d):
    meta = os.path.join(root, META)
    if st.script("environment") is not None:
        # appended to the base's 90-environment.sh (base_layout's head when it had
        # none), as Apptainer's insertEnvScript does
        env90 = os.path.join(meta, "env/90-environment.sh")
        old = ENVIRONMENT_HEAD
        if os.path.isfile(env90) and not os.path.islink(env90):
            with open(env90, errors="surrogateescape") as f:
                old = f.read()
        write_file(env90, old + ("\n" if old != ENVIRONMENT_HEAD else "")
                   + st.script("environment"), 0o755)
    for name in ("runscript", "startscript", "test"):
        if name in st.sections:
            write_file(os.path.join(meta, name), shebang_script(st.sections[name]), 0o755)
    if st.script("help") is not None:
        write_file(os.path.join(meta, "runscript.help"), st.script("help"))
    if st.apps:
        text = ""
        for app in st.apps.values():
            n = app.name
            v = "".join(c if c.isalnum() or c == "_" else "_" for c in n)
            text += (f"## App Global Exports For: {v}\n\nSCIF_APPDATA_{v}=/scif/data/{n}\n"
                     f"SCIF_APPMETA_{v}=/scif/apps/{n}/scif\nSCIF_APPROOT_{v}=/scif/apps/{n}\n"
                     f"SCIF_APPBIN_{v}=/scif/apps/{n}/bin\nSCIF_APPLIB_{v}=/scif/apps/{n}/lib\n\n"
                     f"export SCIF_APPDATA_{v} SCIF_APPMETA_{v} SCIF_APPROOT_{v} "
                     f"SCIF_APPBIN_{v} SCIF_APPLIB_{v}\n")
            am = f"/scif/apps/{n}/scif"
            if app.script("env") is not None:
                text += f'export SCIF_APPENV_{v}="{am}/env/90-environment.sh"\n'
            text += f'export SCIF_APPLABELS_{v}="{am}/labels.json"\n'
            if app.script("run") is not None:
                text += f'export SCIF_APPRUN_{v}="{am}/runscript"\n'
        write_file(os.path.join(meta, "env/94-appsbase.sh"), text, 0o755)
    labels = read_json(os.path.join(meta, "labels.json"))
    from hpcimage import __version__
    from hpcimage.image.sif import host_goarch
    labels.update({
        "org.label-schema.schema-version": "1.0",
        "org.label-schema.build-date": time.strftime("%A_%-d_%B_%Y_%-H:%M:%S_%Z"),
        "org.label-schema.build-arch": host_goarch(),
        "org.label-schema.usage.hpcimage.version": __version__,
        "org.label-schema.usage.singularity.deffile.bootstrap": st.get("bootstrap"),
    })
    if st.get("from"):
        labels["org.label-schema.usage.singularity.deffile.from"] = st.get("from")
    if os.path.exists(os.path.join(meta, "runscript.help")):
        labels["org.label-schema.usage"] = "/.singularity.d/runscript.help"
    labels.update(st.labels)
    write_file(os.path.join(meta, "labels.json"), json.dumps(labels, indent=1, sort_keys=True) + "\n")
    write_file(os.path.join(meta, "Singularity"), d.text if d.text.endswith("\n") else d.text + "\n")


def remove_tree(path):
    """rm -rf PATH, making directories writable where needed (we are root of the
    namespace, but a directory may be read-only or immutable to chmod-less rm)."""
    if not os.path.lexists(path):
        return

    def onerror(func, p, exc):
        try:
            parent = os.path.dirname(p)
            os.chmod(parent, stat.S_IMODE(os.lstat(parent).st_mode) | 0o700)
            if os.path.isdir(p) and not os.path.islink(p):
                os.chmod(p, stat.S_IMODE(os.lstat(p).st_mode) | 0o700)
                shutil.rmtree(p)
            else:
                os.unlink(p)
        except OSError:
            pass
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, onerror=onerror)
    else:
        unlink_missing_ok(path)
