"""Encrypted images, the writing half: an image's SquashFS -> the gocryptfs form that
Apptainer (1.2+, unprivileged) builds, written without FUSE and without root.

    partition (SIF fs type 6, "Gocryptfs squashfs")  an uncompressed SquashFS holding
        gocryptfs.conf     scrypt(N=65536, r=8, p=1) -> HKDF-SHA256 -> AES-256-GCM
                           (16-byte nonce) protecting the 32-byte master key
        squashfs-XXXXXXXX  the image's SquashFS as a gocryptfs file: 00 02, a 16-byte
                           file id, then per 4096-byte block: nonce (16), ciphertext,
                           tag (16); each block's additional data is its number
                           (big-endian uint64) and the file id
    crypto message (PEM mode only)  the gocryptfs password encrypted with RSA-OAEP
        (SHA-256) to a PKCS#1 public key, an ASN.1 OCTET STRING in a PEM MESSAGE
        block, linked to the partition

The format is gocryptfs 2's with -plaintextnames (Apptainer's `gocryptfs -init
-deterministic-names -plaintextnames`); Debian's gocryptfs mounts what this writes
(tests/test_encryption.py). `cryptography` supplies the primitives.
"""
import base64
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile

from hpcimage import fsutil
from hpcimage.errors import HpcimageError, UsageError

BLOCK = 4096
NONCE = 16
TAG = 16
FILE_HEADER_VERSION = b"\x00\x02"
SCRYPT_N, SCRYPT_R, SCRYPT_P = 65536, 8, 1
HKDF_INFO_CONTENT = b"AES-GCM file content encryption"
FEATURES = ["HKDF", "GCMIV128", "PlaintextNames"]
CREATOR = "hpcimage (gocryptfs v2 format)"


def _hkdf(key):
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None,
                info=HKDF_INFO_CONTENT).derive(key)


def _scrypt(password, salt, n=SCRYPT_N, r=SCRYPT_R, p=SCRYPT_P):
    from cryptography.hazmat.primitives.kdf.scrypt import Scrypt
    return Scrypt(salt=salt, length=32, n=n, r=r, p=p).derive(password)


def make_config(password, master_key=None):
    """gocryptfs.conf (bytes) for password (bytes) and the master key it protects."""
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM
    master_key = master_key or os.urandom(32)
    salt = os.urandom(32)
    kek = _hkdf(_scrypt(password, salt))
    nonce = os.urandom(NONCE)
    sealed = nonce + AESGCM(kek).encrypt(nonce, master_key, (0).to_bytes(8, "big"))
    conf = {
        "Creator": CREATOR,
        "EncryptedKey": base64.b64encode(sealed).decode(),
        "ScryptObject": {"Salt": base64.b64encode(salt).decode(), "N": SCRYPT_N,
                         "R": SCRYPT_R, "P": SCRYPT_P, "KeyLen": 32},
        "Version": 2,
        "FeatureFlags": FEATURES,
    }
    return (json.dumps(conf, indent="\t") + "\n").encode(), master_key


def open_config(conf, password):
    """The master key of gocryptfs.conf (bytes) for password; UsageError when the
    password is wrong (the reading half, for tests and tools)."""
    from cryptography.exceptions import InvalidTag
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM
    c = json.loads(conf)
    s = c["ScryptObject"]
    kek = _hkdf(_scrypt(password, base64.b64decode(s["Salt"]), s["N"], s["R"], s["P"]))
    sealed = base64.b64decode(c["EncryptedKey"])
    try:
        return AESGCM(kek).decrypt(sealed[:NONCE], sealed[NONCE:], (0).to_bytes(8, "big"))
    except InvalidTag:
        raise UsageError("wrong passphrase or key") from None


def encrypt_stream(src, dst, master_key):
    """Encrypt the file object src into the file object dst (gocryptfs content
    format); returns the bytes written."""
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM
    aead = AESGCM(_hkdf(master_key))
    file_id = os.urandom(16)
    first = src.read(BLOCK)
    if not first:
        return 0                # gocryptfs: an empty file has no header
    dst.write(FILE_HEADER_VERSION + file_id)
    n = 18
    block_no = 0
    data = first
    urandom = os.urandom
    while data:
        nonce = urandom(NONCE)
        out = aead.encrypt(nonce, data, block_no.to_bytes(8, "big") + file_id)
        dst.write(nonce)
        dst.write(out)
        n += NONCE + len(out)
        block_no += 1
        data = src.read(BLOCK)
    return n


def decrypt_stream(src, dst, master_key):
    """The reverse of encrypt_stream (tests, tools)."""
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM
    aead = AESGCM(_hkdf(master_key))
    head = src.read(18)
    if not head:
        return
    file_id = head[2:]
    block_no = 0
    while True:
        data = src.read(NONCE + BLOCK + TAG)
        if not data:
            return
        dst.write(aead.decrypt(data[:NONCE], data[NONCE:],
                               block_no.to_bytes(8, "big") + file_id))
        block_no += 1


# ------------------------------------------------------------------------- keys

PKCS1_PUBLIC = "a PKCS#1 RSA public key (-----BEGIN RSA PUBLIC KEY-----)"


def new_password():
    """PEM mode's random gocryptfs password (Apptainer's: the hex MD5 of 32 random
    bytes, 32 characters)."""
    return hashlib.md5(os.urandom(32)).hexdigest().encode()


def load_public_pem(path):
    """The RSA public key of the PKCS#1 PEM file at path; UsageError naming the kind
    needed for anything else."""
    try:
        with open(path, "rb") as f:
            data = f.read(1 << 20)
    except OSError as e:
        raise UsageError(f"--pem-path {path}: {e.strerror}") from None
    from cryptography.hazmat.primitives import serialization
    if b"-----BEGIN RSA PUBLIC KEY-----" not in data:
        got = _pem_kind(data)
        raise UsageError(f"--pem-path {path}: {got}: building an encrypted image needs "
                         f"{PKCS1_PUBLIC} (openssl rsa -in key.pem -RSAPublicKey_out)")
    try:
        return serialization.load_pem_public_key(data)
    except ValueError:
        raise UsageError(f"--pem-path {path}: not a valid {PKCS1_PUBLIC}") from None


def _pem_kind(data):
    for label, what in ((b"ENCRYPTED PRIVATE KEY", "an encrypted PKCS#8 private key"),
                        (b"RSA PRIVATE KEY", "an RSA private key"),
                        (b"PRIVATE KEY", "a PKCS#8 private key"),
                        (b"RSA PUBLIC KEY", "a PKCS#1 RSA public key"),
                        (b"PUBLIC KEY", "a public key in SubjectPublicKeyInfo (PKCS#8) form"),
                        (b"OPENSSH PRIVATE KEY", "an OpenSSH private key")):
        if b"-----BEGIN " + label + b"-----" in data:
            return what
    if data.startswith(b"ssh-rsa "):
        return "an OpenSSH public key"
    return "not a PEM key"


def pem_message(public_key, password):
    """RSA-OAEP(SHA-256) of password, as Apptainer's PEM MESSAGE block (bytes)."""
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import padding
    ct = public_key.encrypt(password, padding.OAEP(mgf=padding.MGF1(hashes.SHA256()),
                                                  algorithm=hashes.SHA256(), label=None))
    der = _der_octet_string(ct)
    b64 = base64.b64encode(der).decode()
    lines = [b64[i:i + 64] for i in range(0, len(b64), 64)]
    return ("-----BEGIN MESSAGE-----\n" + "\n".join(lines)
            + "\n-----END MESSAGE-----\n").encode()


def _der_octet_string(b):
    n = len(b)
    if n < 0x80:
        length = bytes([n])
    else:
        nb = n.to_bytes((n.bit_length() + 7) // 8, "big")
        length = bytes([0x80 | len(nb)]) + nb
    return b"\x04" + length + b


# ----------------------------------------------------------------------- writing

class Key:
    """What an image is encrypted with: kind "passphrase" (material: the passphrase,
    bytes) or "pem" (path: the PKCS#1 public key)."""
    __slots__ = ("kind", "material", "path")

    def __init__(self, kind, material=None, path=None):
        self.kind, self.material, self.path = kind, material, path


class _Range:
    """A file's bytes [offset, offset + size) as a file object to read."""
    def __init__(self, f, offset, size):
        self.f, self.left = f, size
        f.seek(offset)

    def read(self, n):
        data = self.f.read(min(n, self.left))
        self.left -= len(data)
        return data


PASSPHRASE_VARS = ("HPCIMAGE_ENCRYPTION_PASSPHRASE", "APPTAINER_ENCRYPTION_PASSPHRASE",
                   "SINGULARITY_ENCRYPTION_PASSPHRASE")
PEM_VARS = ("HPCIMAGE_ENCRYPTION_PEM_PATH", "APPTAINER_ENCRYPTION_PEM_PATH",
            "SINGULARITY_ENCRYPTION_PEM_PATH")


def build_key(passphrase, encrypt, pem_path, environ, warn):
    """The Key `hpcimage build` encrypts with, or None. Apptainer's order
    (cmd/internal/cli/build_linux.go getEncryptionMaterial): the --pem-path flag, the
    --passphrase flag (asked on the terminal; without one, the passphrase variable),
    the *_ENCRYPTION_PEM_PATH variable, the *_ENCRYPTION_PASSPHRASE variable. The
    public key is checked here, before the build."""
    var = next((v for v in PASSPHRASE_VARS if environ.get(v)), None)
    pem_var = next((v for v in PEM_VARS if environ.get(v)), None)
    if not (passphrase or encrypt or pem_path):
        if var or pem_var:
            warn(f"{var or pem_var} is set, but not --encrypt: the image is NOT encrypted")
        return None
    if passphrase and pem_path:
        raise UsageError("--passphrase and --pem-path: choose one")
    if pem_path or (not passphrase and pem_var):
        path = pem_path or environ[pem_var]
        load_public_pem(path)
        return Key("pem", path=os.path.abspath(path))
    if passphrase:
        from hpcimage.runtime import crypt as rtcrypt
        if rtcrypt._tty_ok():
            return Key("passphrase", rtcrypt.ask_terminal(
                "Enter encryption passphrase: ", "Retype encryption passphrase: "))
        if not var:
            raise UsageError("--passphrase: no terminal to ask for the passphrase on: set "
                             "APPTAINER_ENCRYPTION_PASSPHRASE (with --encrypt) instead")
    if not var:
        raise UsageError("--encrypt: no key: set APPTAINER_ENCRYPTION_PASSPHRASE or "
                         "APPTAINER_ENCRYPTION_PEM_PATH, or give --passphrase or --pem-path")
    return Key("passphrase", environ[var].encode())


WORK_PREFIX = ".hpcimage-encrypt-"
HANDLED = ("SIGTERM", "SIGHUP")     # what timeout, scancel and a closed terminal send


def encrypted_build(out, build, key, warn=None):
    """Run build(plain_out) to a plain SIF in a private (0700) work directory beside
    out, then write out, encrypted with key; the work directory goes in every case.

    The plain SIF never outlives the build where the process can help it: SIGTERM and
    SIGHUP remove the work directory and exit 128+N (as Ctrl-C does, 130); once built,
    the plain SIF is unlinked and encrypted from its open descriptor, so a SIGKILL
    from then on leaves no clear image. A SIGKILL during the plain build leaves the
    work directory, named after this host and pid: the next encrypted build beside
    it removes those whose process is gone (sweep_stale), with a note."""
    import signal
    parent = os.path.dirname(os.path.abspath(out))
    sweep_stale(parent, warn)
    try:
        d = tempfile.mkdtemp(prefix=f"{WORK_PREFIX}{_host()}-{os.getpid()}-", dir=parent)
    except OSError as e:
        raise HpcimageError(f"{out}: cannot write beside it: {e.strerror}") from None

    def stop(signum, frame):
        raise _Killed(signum)

    old = {}
    for name in HANDLED:
        n = getattr(signal, name)
        old[n] = signal.signal(n, stop)
    try:
        plain = os.path.join(d, "plain.sif")
        kind = build(plain)
        fd = os.open(plain, os.O_RDONLY)
        try:
            os.unlink(plain)        # from here on only this descriptor holds it
            try:
                encrypt_image(f"/proc/self/fd/{fd}", out, key, tmpdir=d)
            except OSError as e:
                raise HpcimageError(f"{out}: cannot write the encrypted image: "
                                    f"{e.strerror or e}") from None
        finally:
            os.close(fd)
        return kind
    except _Killed as k:
        shutil.rmtree(d, ignore_errors=True)
        d = None
        name = signal.Signals(k.signum).name
        sys.stderr.write(f"hpcimage: build stopped by {name}: the unencrypted image and "
                         f"the temporary files are removed, {out} is not written\n")
        raise SystemExit(128 + k.signum) from None
    finally:
        if d is not None:
            shutil.rmtree(d, ignore_errors=True)
        for n, h in old.items():
            signal.signal(n, h)


class _Killed(BaseException):
    """SIGTERM/SIGHUP during an encrypted build (not an Exception: nothing on the way
    may swallow it; the finally clauses on the way clean up)."""
    def __init__(self, signum):
        super().__init__(signum)
        self.signum = signum


def _host():
    import socket
    return "".join(c if c.isalnum() or c in "-." else "_" for c in socket.gethostname())


def sweep_stale(parent, warn=None):
    """Remove the work directories in parent that an encrypted build on this host left
    when it was killed with SIGKILL (its pid no longer runs); warn(message) for each."""
    prefix = f"{WORK_PREFIX}{_host()}-"
    try:
        names = os.listdir(parent)
    except OSError:
        return
    for name in names:
        if not name.startswith(prefix):
            continue
        pid = name[len(prefix):].split("-", 1)[0]
        path = os.path.join(parent, name)
        try:
            if not pid.isdigit() or os.lstat(path).st_uid != os.getuid():
                continue
            os.kill(int(pid), 0)
            continue                # still running (or a pid reused: left alone)
        except ProcessLookupError:
            pass
        except OSError:
            continue
        shutil.rmtree(path, ignore_errors=True)
        if warn and not os.path.exists(path):
            warn(f"removed {path}, left by an encrypted build (pid {pid}) that was killed")


def outer_squashfs(image, out_path, password, tmpdir):
    """Write at out_path the uncompressed SquashFS that holds gocryptfs.conf and the
    encrypted SquashFS of image (an hpcimage.image.Image: a SquashFS file, or a SIF's
    partition), named squashfs-NNNN as Apptainer's. The clear SquashFS is read in
    place, never copied."""
    work = tempfile.mkdtemp(prefix="hpcimage-encrypt-", dir=tmpdir)
    try:
        conf, master = make_config(password)
        with open(os.path.join(work, "gocryptfs.conf"), "wb") as f:
            f.write(conf)
        os.chmod(os.path.join(work, "gocryptfs.conf"), 0o400)
        name = "squashfs-" + str(int.from_bytes(os.urandom(4), "big"))
        size = image.size if image.size is not None else os.path.getsize(image.path)
        with open(image.path, "rb", buffering=1 << 20) as f, \
                open(os.path.join(work, name), "wb", buffering=1 << 20) as dst:
            encrypt_stream(_Range(f, image.offset, size), dst, master)
        os.chmod(os.path.join(work, name), 0o600)
        cmd = ["mksquashfs", os.path.join(work, "gocryptfs.conf"), os.path.join(work, name),
               out_path, "-noappend", "-all-root", "-no-xattrs", "-noI", "-noD", "-noF",
               "-noX", "-quiet", "-no-progress"]
        try:
            r = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                               text=True)
        except OSError as e:
            raise HpcimageError(f"mksquashfs: {e.strerror} (install squashfs-tools)")
        if r.returncode:
            last = (r.stderr.strip().splitlines() or [f"exit status {r.returncode}"])[-1]
            raise HpcimageError(f"mksquashfs (encrypted image): {last}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


def encrypt_image(plain, out_path, key, tmpdir=None):
    """Write out_path, an encrypted SIF, from plain (a SquashFS file or a SIF with a
    SquashFS primary partition: its definition file and labels objects are kept, in
    clear, as Apptainer keeps them)."""
    from hpcimage.image import open_image, sif
    image = open_image(plain, check_arch=False)
    if image.kind not in ("squashfs", "sif"):
        raise UsageError(f"{plain}: only a SquashFS or SIF image can be encrypted")
    deffile = labels = None
    arch = None
    if image.kind == "sif":
        img = sif.open_sif(image.path)
        for d in img.descriptors:
            if d.data_type == sif.DATA_DEFFILE and deffile is None:
                deffile = img.read_object(d.id)
            elif d.data_type == sif.DATA_LABELS and labels is None:
                labels = img.read_object(d.id)
        arch = image.arch if image.arch not in (None, "unknown") else None
    tmpdir = tmpdir or os.path.dirname(os.path.abspath(out_path))
    if key.kind == "pem":
        public = load_public_pem(key.path)
        password = new_password()
        message = pem_message(public, password)
    else:
        password, message = key.material, None
    fd, outer = tempfile.mkstemp(prefix=".hpcimage-outer-", suffix=".sqfs", dir=tmpdir)
    os.close(fd)
    try:
        outer_squashfs(image, outer, password, tmpdir)
        sif.write_sif(out_path, outer, deffile=deffile, labels=labels, arch=arch,
                      fstype=sif.FS_GOCRYPTFS_SQUASH, crypto_message=message)
    finally:
        try:
            os.unlink(outer)
        except OSError:
            pass
