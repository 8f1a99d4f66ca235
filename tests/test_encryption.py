"""Encrypted images (issue 19; docs/encryption.md): built and run as the test user,
Apptainer's gocryptfs format (Debian's gocryptfs mounts what hpcimage writes), the
passphrase and PEM modes, the variables, wrong keys and wrong key kinds, and nothing
left behind (kill -9 included)."""
import json
import os
import signal
import subprocess
import shutil
import tempfile
import time
from pathlib import Path

import pytest

from conftest import cli_argv, host_mounts_of_ours, launch_helpers, readable, runtime_argv

PASS = "correct horse battery staple"
VARS = ("HPCIMAGE_ENCRYPTION_PASSPHRASE", "APPTAINER_ENCRYPTION_PASSPHRASE",
        "SINGULARITY_ENCRYPTION_PASSPHRASE")


def helpers(uid):
    """squashfuse and gocryptfs processes of uid (not zombies): (pid, name)."""
    return [(pid, comm) for pid, comm in launch_helpers(uid)
            if comm.startswith(("squashfuse", "gocryptfs"))]


def our_mounts():
    return host_mounts_of_ours()


def assert_clean(user, timeout=5.0):
    deadline = time.monotonic() + timeout
    while helpers(user.uid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert helpers(user.uid) == [] and our_mounts() == []


def write_keys(d, user):
    """rsa_pri.pem (PKCS#1), rsa_pub.pem (PKCS#1 public) and the wrong kinds."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    F = serialization.PrivateFormat
    E = serialization.Encoding.PEM
    files = {
        "rsa_pri.pem": key.private_bytes(E, F.TraditionalOpenSSL, serialization.NoEncryption()),
        "rsa_pub.pem": key.public_key().public_bytes(E, serialization.PublicFormat.PKCS1),
        "spki_pub.pem": key.public_key().public_bytes(
            E, serialization.PublicFormat.SubjectPublicKeyInfo),
        "pkcs8.pem": key.private_bytes(E, F.PKCS8, serialization.NoEncryption()),
        "encrypted.pem": key.private_bytes(E, F.TraditionalOpenSSL,
                                           serialization.BestAvailableEncryption(b"pw")),
        "other_pri.pem": other.private_bytes(E, F.TraditionalOpenSSL,
                                             serialization.NoEncryption()),
    }
    for name, data in files.items():
        p = d / name
        p.write_bytes(data)
        os.chown(p, user.uid, user.gid)
        p.chmod(0o600)
    return {k: str(d / k) for k in files}


@pytest.fixture(scope="module")
def built(user, demo_dir):
    """Encrypted SIFs of the demo image built by the test user: passphrase, PEM."""
    base = Path("/tmp/hpcimage-tests")
    base.mkdir(exist_ok=True)
    base.chmod(0o755)
    d = Path(tempfile.mkdtemp(dir=base, prefix="crypt-"))
    d.chmod(0o755)
    os.chown(d, user.uid, user.gid)
    try:
        keys = write_keys(d, user)
        pw = str(d / "pw.sif")
        r = user.run(cli_argv("build", "--encrypt", pw, str(demo_dir)),
                     env={"APPTAINER_ENCRYPTION_PASSPHRASE": PASS}, cwd=str(d))
        assert r.returncode == 0, r.stderr
        pem = str(d / "pem.sif")
        r = user.run(cli_argv("build", "--pem-path", keys["rsa_pub.pem"], pem, str(demo_dir)),
                     cwd=str(d))
        assert r.returncode == 0, r.stderr
        yield {"dir": d, "pw": pw, "pem": pem, **keys}
    finally:
        shutil.rmtree(d, ignore_errors=True)


def run(user, built, *args, env=None, prog="exec"):
    return user.run(runtime_argv(prog, *args), env=env or {}, cwd=str(built["dir"]))


# ------------------------------------------------------------------ the format

def test_sif_list_and_inspect_say_encrypted(user, built):
    r = user.run(cli_argv("sif", "list", built["pw"]))
    assert r.returncode == 0 and "Gocryptfs squashfs" in r.stdout, r.stdout
    r = user.run(cli_argv("sif", "list", built["pem"]))
    assert "Cryptographic Message" in r.stdout or "Crypto" in r.stdout, r.stdout
    for name, how in (("pw", "passphrase"), ("pem", "PEM")):
        r = user.run(cli_argv("inspect", "--summary", built[name]))
        assert r.returncode == 0, r.stderr
        assert "encrypted" in r.stdout and how in r.stdout, r.stdout


def test_debian_gocryptfs_mounts_what_hpcimage_wrote(user, built, demo_dir, userdir):
    """The partition holds gocryptfs.conf and squashfs-N; Debian's gocryptfs (as the
    test user, root only of a user namespace) decrypts it to the image's SquashFS."""
    from hpcimage.image import sif
    img = sif.open_sif(built["pw"])
    part = img.primary_partition()
    assert part.fstype == 6
    out = userdir / "outer"
    r = user.run(["unsquashfs", "-d", str(out), "-o", str(part.offset), built["pw"]])
    assert r.returncode == 0, r.stderr
    names = sorted(os.listdir(out))
    assert names[0] == "gocryptfs.conf" and names[1].startswith("squashfs-") and len(names) == 2
    conf = json.loads((out / "gocryptfs.conf").read_text())
    assert conf["ScryptObject"]["N"] == 65536 and "PlaintextNames" in conf["FeatureFlags"]
    pwfile = userdir / "pw"
    pwfile.write_text(PASS + "\n")
    os.chown(pwfile, user.uid, user.gid)
    pwfile.chmod(0o600)
    plain = userdir / "plain"
    plain.mkdir()
    os.chown(plain, user.uid, user.gid)
    script = (f"gocryptfs -q -ro -passfile {pwfile} {out} {plain} && "
              f"unsquashfs -cat {plain}/{names[1]} /etc/os-release; rc=$?; "
              f"umount {plain}; exit $rc")
    r = user.run(["unshare", "-rm", "sh", "-c", script])
    assert r.returncode == 0, r.stderr
    assert "hpcimage Demo" in r.stdout
    assert (demo_dir / "etc/os-release").read_text() == r.stdout


def test_gocryptfs_init_config_opens_with_the_reader(tmp_path):
    """The other way: a gocryptfs.conf that Debian's gocryptfs -init wrote opens with
    hpcimage's reading half (the same key derivation)."""
    from hpcimage.errors import UsageError
    from hpcimage.imagebuild import crypt
    d = tmp_path / "c"
    d.mkdir()
    r = subprocess.run(["gocryptfs", "-q", "-init", "-plaintextnames", "-passfile",
                        "/dev/stdin", str(d)], input=PASS + "\n", text=True,
                       capture_output=True)
    assert r.returncode == 0, r.stderr
    conf = (d / "gocryptfs.conf").read_bytes()
    assert len(crypt.open_config(conf, PASS.encode())) == 32
    with pytest.raises(UsageError):
        crypt.open_config(conf, b"wrong")


# ------------------------------------------------------------------ running

@pytest.mark.parametrize("var", VARS)
def test_passphrase_variables(user, built, var):
    r = run(user, built, built["pw"], "sh", "-c", "cat /etc/os-release; env",
            env={var: PASS})
    assert r.returncode == 0, r.stderr
    assert "hpcimage Demo" in r.stdout
    assert PASS not in r.stdout     # the passphrase stays outside the container
    assert_clean(user)


@pytest.mark.parametrize("verb", ["run", "shell"])
def test_run_and_shell(user, built, verb):
    args = [built["pw"]] + (["-c", "echo shell-ok"] if verb == "shell" else [])
    r = user.run(runtime_argv(verb, *args), env={"APPTAINER_ENCRYPTION_PASSPHRASE": PASS},
                 cwd=str(built["dir"]))
    assert r.returncode == 0, r.stderr
    if verb == "shell":
        assert "shell-ok" in r.stdout


def test_wrapper_with_pem_key(user, built):
    r = user.run(runtime_argv("image-exec", "--pem-path", built["rsa_pri.pem"], "cat",
                              "/etc/os-release"),
                 env={"HPCIMAGE_IMAGE": built["pem"]}, cwd=str(built["dir"]))
    assert r.returncode == 0, r.stderr
    assert "hpcimage Demo" in r.stdout
    r = user.run(runtime_argv("image-exec", "true"),
                 env={"HPCIMAGE_IMAGE": built["pem"],
                      "APPTAINER_ENCRYPTION_PEM_PATH": built["rsa_pri.pem"]},
                 cwd=str(built["dir"]))
    assert r.returncode == 0, r.stderr
    assert_clean(user)


def test_wrong_passphrase(user, built):
    r = run(user, built, built["pw"], "true",
            env={"APPTAINER_ENCRYPTION_PASSPHRASE": "wrong"})
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [
        f"hpcimage: error: {built['pw']}: wrong passphrase or key"]
    assert_clean(user)


def test_wrong_pem_key(user, built):
    r = run(user, built, "--pem-path", built["other_pri.pem"], built["pem"], "true")
    assert r.returncode == 2
    assert len(r.stderr.strip().splitlines()) == 1 and "wrong key" in r.stderr
    assert_clean(user)


@pytest.mark.parametrize("kind,said", [
    ("pkcs8.pem", "a PKCS#8 private key"),
    ("encrypted.pem", "passphrase-protected"),
    ("rsa_pub.pem", "public key, not a private one"),
])
def test_wrong_key_kinds(user, built, kind, said):
    r = run(user, built, "--pem-path", built[kind], built["pem"], "true")
    assert r.returncode == 2, r.stderr
    line, = r.stderr.strip().splitlines()
    assert said in line and "unencrypted PKCS#1 RSA private key" in line, line
    assert_clean(user)


def test_no_key_given(user, built):
    r = run(user, built, built["pw"], "true")
    assert r.returncode == 2 and "encrypted with a passphrase" in r.stderr
    r = run(user, built, built["pem"], "true")
    assert r.returncode == 2 and "--pem-path" in r.stderr


def test_passphrase_without_terminal_fails_fast(user, built):
    p = user.popen(runtime_argv("exec", "--passphrase", built["pw"], "true"),
                   cwd=str(built["dir"]), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                   stderr=subprocess.PIPE, text=True, start_new_session=True)
    out, err = p.communicate(timeout=30)
    assert p.returncode == 2 and "no terminal" in err and "ENCRYPTION_PASSPHRASE" in err
    assert_clean(user)


def test_passphrase_on_the_terminal(user, built):
    """--passphrase asks on the terminal (script(1) gives one)."""
    cmd = " ".join(runtime_argv("exec", "--passphrase", built["pw"], "cat", "/etc/os-release"))
    p = user.popen(["script", "-qec", cmd, "/dev/null"], cwd=str(built["dir"]),
                   stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                   text=True, start_new_session=True)
    time.sleep(1.0)
    out, err = p.communicate(PASS + "\n", timeout=60)
    assert p.returncode == 0, out + err
    assert "Enter passphrase for encrypted container:" in out and "hpcimage Demo" in out
    assert PASS not in out          # no echo


def test_sigkill_leaves_nothing(user, built):
    p = user.popen(runtime_argv("exec", built["pw"], "sh", "-c", "echo ready; sleep 60"),
                   env={"APPTAINER_ENCRYPTION_PASSPHRASE": PASS}, cwd=str(built["dir"]),
                   stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "ready"
    comms = sorted(c for _, c in helpers(user.uid))
    assert "gocryptfs" in comms and len(comms) == 3, comms
    os.kill(p.pid, signal.SIGKILL)
    p.wait(timeout=10)
    assert_clean(user)


def test_passphrase_not_on_a_command_line(user, built):
    p = user.popen(runtime_argv("exec", built["pw"], "sh", "-c", "echo ready; sleep 60"),
                   env={"APPTAINER_ENCRYPTION_PASSPHRASE": PASS}, cwd=str(built["dir"]),
                   stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline().strip() == "ready"
        for pid, comm in helpers(user.uid):
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                assert PASS.encode() not in f.read()
            with open(f"/proc/{pid}/environ", "rb") as f:
                assert PASS.encode() not in f.read()
    finally:
        p.kill()
        p.wait()
    assert_clean(user)


# ------------------------------------------------------------------ building

def test_build_errors(user, demo_dir, userdir, built):
    out = str(userdir / "x.sif")
    p = user.popen(cli_argv("build", "--passphrase", out, str(demo_dir)), cwd=str(userdir),
                   stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                   text=True, start_new_session=True)
    _, err = p.communicate(timeout=60)
    assert p.returncode == 2 and "no terminal" in err, err
    r = user.run(cli_argv("build", "--encrypt", out, str(demo_dir)), cwd=str(userdir))
    assert r.returncode == 2 and "no key" in r.stderr
    for kind, said in (("spki_pub.pem", "SubjectPublicKeyInfo"),
                       ("rsa_pri.pem", "an RSA private key")):
        r = user.run(cli_argv("build", "--pem-path", built[kind], out, str(demo_dir)),
                     cwd=str(userdir))
        assert r.returncode == 2 and said in r.stderr and "PKCS#1 RSA public key" in r.stderr
    r = user.run(cli_argv("build", "--encrypt", str(userdir / "x.sqfs"), str(demo_dir)),
                 env={"APPTAINER_ENCRYPTION_PASSPHRASE": PASS}, cwd=str(userdir))
    assert r.returncode == 2 and "is a SIF" in r.stderr
    assert os.listdir(userdir) == []        # nothing half-written
    r = user.run(cli_argv("build", "--encrypt", str(built["dir"].parent / "x.sif"),
                          str(demo_dir)), env={"APPTAINER_ENCRYPTION_PASSPHRASE": PASS})
    assert r.returncode == 1 and r.stderr.strip().splitlines() == [
        f"hpcimage: error: {built['dir'].parent}/x.sif: cannot write beside it: "
        "Permission denied"]
    r = user.run(cli_argv("build", out, str(demo_dir)),
                 env={"APPTAINER_ENCRYPTION_PASSPHRASE": PASS}, cwd=str(userdir))
    assert r.returncode == 0 and "NOT encrypted" in r.stderr
    r = user.run(cli_argv("build", "--encrypt", str(userdir / "e.sif"), str(demo_dir)),
                 env={"APPTAINER_ENCRYPTION_PASSPHRASE": PASS}, cwd=str(userdir))
    assert r.returncode == 0 and "NOT encrypted" not in r.stderr
    assert r.stderr.strip().splitlines()[-1] == (
        f"hpcimage: built {userdir}/e.sif (sif, encrypted: passphrase) from {demo_dir}")
    assert sorted(os.listdir(userdir)) == ["e.sif", "x.sif"]   # no temporary left


def test_build_a_definition_file_for_an_rsa_key(user, built, userdir):
    """The definition-file builder (a user namespace) then the encryption, with the
    definition file object in clear, as Apptainer keeps it."""
    out = str(userdir / "def.sif")
    r = user.run(cli_argv("build", "--pem-path", built["rsa_pub.pem"], out,
                          str(readable("images/Demo.def"))), cwd=str(userdir), timeout=300)
    assert r.returncode == 0, r.stderr
    r = user.run(runtime_argv("run", "--pem-path", built["rsa_pri.pem"], out),
                 cwd=str(userdir))
    assert r.returncode == 0, r.stderr
    r = user.run(cli_argv("inspect", "--deffile", out))
    assert r.returncode == 0 and "Bootstrap:" in r.stdout, r.stdout
    assert_clean(user)


def test_build_from_encrypted_source_refused(user, built, userdir):
    r = user.run(cli_argv("build", str(userdir / "y.sqfs"), built["pw"]), cwd=str(userdir))
    assert r.returncode == 2 and "encrypted" in r.stderr


def test_encrypted_sif_refused_by_overlay_create_and_data_binds(user, built, userdir):
    """Both kinds (passphrase: no crypto message; PEM) are encrypted for every check."""
    for kind in ("pw", "pem"):
        enc = userdir / f"{kind}.sif"
        shutil.copy(built[kind], enc)
        os.chown(enc, user.uid, user.gid)
        before = enc.read_bytes()
        r = user.run(cli_argv("overlay", "create", str(enc)), cwd=str(userdir))
        assert r.returncode == 2 and r.stderr.strip().splitlines() == [
            f"hpcimage: error: overlay create: {enc} is an encrypted SIF: hpcimage cannot "
            "add an overlay partition to it"], r.stderr
        assert enc.read_bytes() == before
        r = run(user, built, "-B", f"{enc}:/d:image-src=/", built["pw"], "true",
                env={"APPTAINER_ENCRYPTION_PASSPHRASE": PASS})
        assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
        assert f"{enc} is an encrypted SIF: it cannot be bound as data" in r.stderr
    assert_clean(user)


def test_build_key_order_is_apptainers(user, built, demo_sqfs, userdir):
    """--pem-path, --passphrase, the PEM variable, the passphrase variable."""
    both = {"APPTAINER_ENCRYPTION_PEM_PATH": built["rsa_pub.pem"],
            "APPTAINER_ENCRYPTION_PASSPHRASE": PASS}
    out = userdir / "x.sif"
    r = user.run(cli_argv("build", "-e", str(out), str(demo_sqfs)), env=both, cwd=str(userdir))
    assert r.returncode == 0, r.stderr
    assert r.stderr.strip().splitlines()[-1].endswith("(sif, encrypted: pem) from "
                                                      + str(demo_sqfs))
    r = user.run(cli_argv("sif", "list", str(out)))
    assert "Cryptographic Message" in r.stdout
    r = run(user, built, "--pem-path", built["rsa_pri.pem"], str(out), "cat", "/etc/os-release")
    assert r.returncode == 0 and "hpcimage Demo" in r.stdout, r.stderr
    from hpcimage.imagebuild import crypt
    key = crypt.build_key(False, True, None, both, print)
    assert key.kind == "pem"
    key = crypt.build_key(False, False, built["rsa_pub.pem"], both, print)
    assert key.kind == "pem"
    key = crypt.build_key(False, True, None, {"APPTAINER_ENCRYPTION_PASSPHRASE": PASS}, print)
    assert key.kind == "passphrase"
    assert_clean(user)


def test_build_refuses_an_encrypted_source_before_any_warning(user, built, userdir):
    r = user.run(cli_argv("build", str(userdir / "y.sif"), built["pw"]),
                 env={"APPTAINER_ENCRYPTION_PASSPHRASE": PASS}, cwd=str(userdir))
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [
        f"hpcimage: error: {built['pw']}: an encrypted image (gocryptfs): it runs with its "
        "key but cannot be converted or used as a build source"], r.stderr
    assert os.listdir(userdir) == []


def _start_encrypted_build(user, userdir, source, out="k.sif"):
    """A build --encrypt of source, and the moment its work directory appears."""
    p = user.popen(cli_argv("build", "--encrypt", str(userdir / out), str(source)),
                   env={"APPTAINER_ENCRYPTION_PASSPHRASE": PASS}, cwd=str(userdir),
                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not any(n.startswith(".hpcimage-encrypt-") for n in os.listdir(userdir)):
        assert p.poll() is None and time.monotonic() < deadline, "the build ended first"
        time.sleep(0.002)
    return p


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP])
def test_build_stopped_by_sigterm_leaves_nothing(user, userdir, debian_sqfs, sig):
    """timeout and scancel send SIGTERM: the unencrypted image must not stay behind."""
    p = _start_encrypted_build(user, userdir, debian_sqfs)
    time.sleep(0.1)
    os.kill(p.pid, sig)
    _, err = p.communicate(timeout=60)
    assert p.returncode == 128 + sig, err
    assert f"build stopped by {signal.Signals(sig).name}" in err
    assert os.listdir(userdir) == []


def test_build_killed_by_sigkill_is_swept_by_the_next(user, userdir, debian_sqfs, demo_sqfs):
    """SIGKILL cannot be handled: what it leaves goes at the next encrypted build there,
    and the plain image is unlinked as soon as it is built."""
    p = _start_encrypted_build(user, userdir, debian_sqfs)
    time.sleep(0.1)
    os.kill(p.pid, signal.SIGKILL)
    p.communicate(timeout=60)
    left = [n for n in os.listdir(userdir) if n.startswith(".hpcimage-encrypt-")]
    assert left
    r = user.run(cli_argv("build", "--encrypt", str(userdir / "n.sif"), str(demo_sqfs)),
                 env={"APPTAINER_ENCRYPTION_PASSPHRASE": PASS}, cwd=str(userdir))
    assert r.returncode == 0, r.stderr
    assert f"removed {userdir}/{left[0]}, left by an encrypted build (pid {p.pid})" in r.stderr
    assert [n for n in os.listdir(userdir) if n.startswith(".hpcimage-encrypt-")] == []


def test_plain_image_is_unlinked_while_encrypting(user, userdir, debian_sqfs):
    """While the encryption runs, no plain.sif is in the work directory."""
    p = _start_encrypted_build(user, userdir, debian_sqfs)
    seen = []
    try:
        while p.poll() is None:
            for n in os.listdir(userdir):
                if n.startswith(".hpcimage-encrypt-"):
                    try:
                        names = os.listdir(userdir / n)
                    except OSError:
                        continue
                    if any(x.startswith(("squashfs-", ".hpcimage-outer")) or
                           x.startswith("hpcimage-encrypt-") for x in names):
                        seen.append(names)
            time.sleep(0.005)
    finally:
        p.communicate(timeout=120)
    assert p.returncode == 0
    assert seen and not any("plain.sif" in names for names in seen), seen


# ------------------------------------------------------------------ the store

from test_store import Store, store  # noqa: E402,F401  (the store fixture)


def test_publish_and_image_update_carry_encrypted_images(store, built):
    store.publish(built["pw"], "Other", "1")
    env = {"HPCIMAGE_IMAGE": str(store.dir / "Other-1.sqfs"), "HPCIMAGE_MODULE": "Other/1"}
    r = store.update(env=env)
    assert r.returncode == 0, r.stderr
    local = store.local / "Other-1.sqfs"
    assert local.read_bytes() == Path(built["pw"]).read_bytes()
    env["APPTAINER_ENCRYPTION_PASSPHRASE"] = PASS
    r = store.run_image("cat", "/etc/os-release", env=env)
    assert r.returncode == 0 and "hpcimage Demo" in r.stdout, r.stderr
    env["APPTAINER_ENCRYPTION_PASSPHRASE"] = "wrong"
    r = store.run_image("true", env=env)
    assert r.returncode == 2 and "wrong passphrase" in r.stderr
    assert_clean(store.user)


def test_dry_run_shows_the_decrypt_op_never_the_key(user, built):
    r = run(user, built, "--dry-run", built["pw"], "true",
            env={"APPTAINER_ENCRYPTION_PASSPHRASE": PASS})
    assert r.returncode == 0, r.stderr
    assert "decrypt " + built["pw"] in r.stdout and "$APPTAINER_ENCRYPTION_PASSPHRASE" in r.stdout
    assert PASS not in r.stdout


def test_image_mpi_runs_an_encrypted_image(user, built):
    r = user.run(runtime_argv("image-mpi", "-n", "2", "cat", "/etc/os-release"),
                 env={"HPCIMAGE_IMAGE": built["pw"], "APPTAINER_ENCRYPTION_PASSPHRASE": PASS},
                 cwd=str(built["dir"]))
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("hpcimage Demo 1.0") == 2
    assert_clean(user)


def test_key_source_order_and_kinds():
    """Which key a launch takes (runtime/crypt.key_source), without a container."""
    from hpcimage.errors import UsageError
    from hpcimage.image import Image
    from hpcimage.runtime import crypt, options
    pw = Image("/x.sif", "sif", 4096, 10, "amd64", "passphrase")
    pem = Image("/y.sif", "sif", 4096, 10, "amd64", "pem")
    o = options.parse(["exec", "/x.sif", "true"], {})
    env = {"SINGULARITY_ENCRYPTION_PASSPHRASE": "s", "APPTAINER_ENCRYPTION_PASSPHRASE": "a"}
    assert crypt.key_source(pw, o, env) == crypt.KeySource(
        "env", "APPTAINER_ENCRYPTION_PASSPHRASE", "a")
    env["HPCIMAGE_ENCRYPTION_PASSPHRASE"] = "h"
    assert crypt.key_source(pw, o, env).value == "h"
    with pytest.raises(UsageError, match="encrypted for an RSA key"):
        crypt.key_source(pem, o, env)
    o = options.parse(["exec", "/y.sif", "true"], {"APPTAINER_ENCRYPTION_PEM_PATH": "/k.pem"})
    assert crypt.key_source(pem, o, {}) == crypt.KeySource("pem", value="/k.pem")
    with pytest.raises(UsageError, match="with a passphrase, not for an RSA key"):
        crypt.key_source(pw, o, {})
    assert "/k.pem" in repr(crypt.key_source(pem, o, {}))
    assert "a" not in repr(crypt.KeySource("env", "X", "a secret")).replace("passphrase", "")
