"""Encrypted images at run time (docs/encryption.md): the key, and the Decrypt op that
turns an encrypted SIF into the SquashFS file MountImage mounts.

    squashfuse   the SIF's partition (an uncompressed SquashFS) -> SESSION/crypt/outer
    gocryptfs    outer (gocryptfs.conf + the cipher file) -> SESSION/crypt/plain
    (MountImage) squashfuse of plain/squashfs-N -> SESSION/image, as any SquashFS

All three daemons are children of the launcher in its user and mount namespaces
(linux.spawn: they die with it, the mounts with the namespace); the decrypted image
exists only as what gocryptfs serves, never on a disk. The password reaches gocryptfs
on a pipe (-passfile /dev/fd/N): never on a command line, in an environment or in a
file. Standard library only; `cryptography` is imported only to open a PEM key.
"""
import os

from hpcimage.errors import HpcimageError, UsageError
from hpcimage.image import Image
from hpcimage.linux import spawn, syscalls
from hpcimage.runtime.ops import Op, quote

PASSPHRASE_VARS = ("HPCIMAGE_ENCRYPTION_PASSPHRASE", "APPTAINER_ENCRYPTION_PASSPHRASE",
                   "SINGULARITY_ENCRYPTION_PASSPHRASE")
PEM_VARS = ("HPCIMAGE_ENCRYPTION_PEM_PATH",)    # APPTAINER_/SINGULARITY_: options.FLAGS
PKCS1_PRIVATE = "an unencrypted PKCS#1 RSA private key (-----BEGIN RSA PRIVATE KEY-----)"
GOCRYPTFS_BAD_PASSWORD = 12     # gocryptfs's exit status for a wrong password
PROMPT = "Enter passphrase for encrypted container: "


class KeySource:
    """Where the key comes from: kind "env" (name: the variable; value), "terminal",
    or "pem" (value: the private key's path)."""
    __slots__ = ("kind", "name", "value")

    def __init__(self, kind, name=None, value=None):
        self.kind, self.name, self.value = kind, name, value

    def __eq__(self, other):
        return type(self) is type(other) and (self.kind, self.name, self.value) == (
            other.kind, other.name, other.value)

    __hash__ = None

    def __repr__(self):         # never the passphrase (--dry-run, errors)
        if self.kind == "env":
            return f"the passphrase in ${self.name}"
        if self.kind == "pem":
            return f"the PEM private key {self.value}"
        return "the passphrase asked on the terminal"


def key_source(image, opts, environ):
    """How to get image's key from the command line and the environment; UsageError
    (exit 2) when none is given or it is of the wrong kind for the image."""
    pem = opts.pem_path or next((environ[v] for v in PEM_VARS if environ.get(v)), None)
    var = next((v for v in PASSPHRASE_VARS if environ.get(v)), None)
    if image.crypt == "pem":
        if not pem:
            raise UsageError(f"{image.path} is encrypted for an RSA key: give its private "
                             "key with --pem-path FILE (or APPTAINER_ENCRYPTION_PEM_PATH)")
        return KeySource("pem", value=os.path.abspath(pem))
    if pem and not opts.passphrase and not var:
        raise UsageError(f"{image.path} is encrypted with a passphrase, not for an RSA "
                         "key: give --passphrase or set APPTAINER_ENCRYPTION_PASSPHRASE")
    if opts.passphrase and _tty_ok():
        return KeySource("terminal")
    if var:
        return KeySource("env", var, environ[var])
    if opts.passphrase:
        raise UsageError(f"--passphrase: no terminal to ask for the passphrase of "
                         f"{image.path} on: set APPTAINER_ENCRYPTION_PASSPHRASE instead")
    raise UsageError(f"{image.path} is encrypted with a passphrase: give --passphrase "
                     "(asks on the terminal) or set APPTAINER_ENCRYPTION_PASSPHRASE")


def _tty_ok():
    try:
        os.close(os.open("/dev/tty", os.O_RDWR | os.O_NOCTTY))
        return True
    except OSError:
        return False


def decrypt(r, p):
    """The step's part (steps.session): add the Decrypt op for r.image and return the
    Image MountImage mounts (the decrypted SquashFS, reached through a link)."""
    base = r.session_dir + "/crypt"
    src = key_source(r.image, r.opts, r.environ)
    p.add(Decrypt(r.image, base, src))
    p.notes.append(f"encrypted image ({r.image.crypt}): decrypted by gocryptfs with {src!r}")
    return Image(base + "/image", "squashfs", 0, None, r.image.arch)


class Decrypt(Op):
    """Mount image's partition and gocryptfs over it below base; base/image: a link to
    the decrypted SquashFS file. key: a KeySource."""
    __slots__ = ("image", "base", "key")
    name = "decrypt"

    def __init__(self, image, base, key):
        self.image, self.base, self.key = image, base, key

    def describe(self):
        return [f"decrypt {quote(self.image.path)} -> {quote(self.base)}/image  # "
                f"squashfuse + gocryptfs, {self.key!r}"]

    def __repr__(self):
        return f"Decrypt({self.image.path!r}, {self.base!r}, {self.key!r})"

    def __eq__(self, other):
        return type(self) is type(other) and (self.image.path, self.base, self.key) == (
            other.image.path, other.base, other.key)

    __hash__ = None

    def run(self, state):
        password = password_for(self.image, self.key)
        for v in PASSPHRASE_VARS:       # the helper daemons inherit no passphrase
            os.environ.pop(v, None)
        base = self.base
        outer, plain = base + "/outer", base + "/plain"
        os.mkdir(base, 0o700)
        os.mkdir(outer, 0o700)
        os.mkdir(plain, 0o700)
        from hpcimage.image import squashfs
        state.data_pids.append(squashfs.mount(
            Image(self.image.path, "squashfs", self.image.offset, self.image.size),
            outer, base + "/outer.log"))
        names = [n for n in os.listdir(outer) if n.startswith("squashfs-")]
        if "gocryptfs.conf" not in os.listdir(outer) or len(names) != 1:
            raise HpcimageError(f"{self.image.path}: the encrypted partition holds no "
                                "gocryptfs.conf and one squashfs-* file: not an image "
                                "Apptainer or hpcimage encrypted")
        state.data_pids.append(mount_gocryptfs(self.image.path, outer, plain, password,
                                               base + "/gocryptfs.log"))
        os.symlink(f"{plain}/{names[0]}", base + "/image")


def find_gocryptfs():
    for d in (os.environ.get("PATH") or "/usr/bin:/bin").split(":") + ["/usr/bin"]:
        p = os.path.join(d or ".", "gocryptfs")
        if os.access(p, os.X_OK):
            return p
    raise HpcimageError("gocryptfs not found: install gocryptfs (2.x) to run encrypted "
                        "images")


def mount_gocryptfs(image_path, cipher, plain, password, log_path):
    """gocryptfs -fg -ro over cipher at plain, the password on a pipe; a child that
    dies with the launcher. go-fuse mounts by itself: CAP_SYS_ADMIN of the user
    namespace as an ambient capability. Waits for the mount; UsageError (exit 2) for
    a wrong password, HpcimageError otherwise."""
    prog = find_gocryptfs()
    rfd, wfd = os.pipe()
    try:
        os.write(wfd, password + b"\n")     # a pipe holds 64 KiB: no writer needed
    finally:
        os.close(wfd)
    argv = [prog, "-fg", "-ro", "-nosyslog", "-passfile", f"/dev/fd/{rfd}", cipher, plain]
    before = os.stat(plain).st_dev
    try:
        pid = spawn.spawn_daemon(prog, argv, log_path, [rfd], (syscalls.CAP_SYS_ADMIN,))
    finally:
        os.close(rfd)
    try:
        status = spawn.wait_mounted(pid, plain, before, 60)
    except TimeoutError:
        raise HpcimageError(f"{image_path}: gocryptfs did not mount the image in 60 s") from None
    if status is None:
        return pid
    if os.WIFEXITED(status) and os.WEXITSTATUS(status) == GOCRYPTFS_BAD_PASSWORD:
        raise UsageError(f"{image_path}: wrong passphrase or key")
    why = spawn.why_it_failed(log_path, status)
    raise HpcimageError(f"{image_path}: gocryptfs could not mount the encrypted image: {why}")


# ------------------------------------------------------------------------- keys

def password_for(image, key):
    """The gocryptfs password (bytes) from key (a KeySource)."""
    if key.kind == "env":
        return key.value.encode()
    if key.kind == "terminal":
        return ask_terminal()
    return pem_password(image.path, key.value)


def ask_terminal(prompt=PROMPT, confirm=None, what="--passphrase"):
    """A passphrase read on /dev/tty without echo (twice where confirm is a prompt);
    UsageError without a terminal, for an empty one or two that differ."""
    import termios
    try:
        fd = os.open("/dev/tty", os.O_RDWR | os.O_NOCTTY)
    except OSError:
        raise UsageError(f"{what}: no terminal to ask on: set "
                         "APPTAINER_ENCRYPTION_PASSPHRASE instead") from None
    try:
        old = termios.tcgetattr(fd)
        new = list(old)
        new[3] &= ~termios.ECHO
        answers = []
        for p in (prompt, confirm) if confirm else (prompt,):
            os.write(fd, p.encode())
            termios.tcsetattr(fd, termios.TCSADRAIN, new)
            try:
                with os.fdopen(os.dup(fd), "rb", buffering=0) as f:
                    answers.append(f.readline().rstrip(b"\n"))
            finally:
                termios.tcsetattr(fd, termios.TCSADRAIN, old)
                os.write(fd, b"\n")
    finally:
        os.close(fd)
    if not answers[0]:
        raise UsageError(f"{what}: an empty passphrase")
    if len(answers) == 2 and answers[0] != answers[1]:
        raise UsageError(f"{what}: the passphrases do not match")
    return answers[0]


def pem_kind(data):
    """What a PEM file holds, in words (for the message naming the kind needed)."""
    if b"Proc-Type: 4,ENCRYPTED" in data:
        return "a passphrase-protected (encrypted) PEM private key"
    for label, what in ((b"ENCRYPTED PRIVATE KEY", "an encrypted PKCS#8 private key"),
                        (b"RSA PRIVATE KEY", "a PKCS#1 RSA private key"),
                        (b"OPENSSH PRIVATE KEY", "an OpenSSH private key"),
                        (b"PRIVATE KEY", "a PKCS#8 private key"),
                        (b"RSA PUBLIC KEY", "an RSA public key, not a private one"),
                        (b"PUBLIC KEY", "a public key, not a private one")):
        if b"-----BEGIN " + label + b"-----" in data:
            return what
    return "not a PEM key"


def pem_password(image_path, key_path):
    """Decrypt the image's PEM message (RSA-OAEP, SHA-256) with the PKCS#1 private key
    at key_path; UsageError (exit 2) for a key of the wrong kind or the wrong key."""
    try:
        with open(key_path, "rb") as f:
            data = f.read(1 << 20)
    except OSError as e:
        raise UsageError(f"--pem-path {key_path}: {e.strerror}") from None
    kind = pem_kind(data)
    if kind != "a PKCS#1 RSA private key":
        raise UsageError(f"--pem-path {key_path}: {kind}: running an encrypted image "
                         f"needs {PKCS1_PRIVATE}")
    message = _message(image_path)
    try:
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import padding, rsa
    except ImportError:
        raise HpcimageError("the Python package 'cryptography' is needed to open an "
                            "image encrypted for an RSA key") from None
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError):
        raise UsageError(f"--pem-path {key_path}: not a valid key: running an encrypted "
                         f"image needs {PKCS1_PRIVATE}") from None
    if not isinstance(key, rsa.RSAPrivateKey):
        raise UsageError(f"--pem-path {key_path}: not an RSA key: running an encrypted "
                         f"image needs {PKCS1_PRIVATE}")
    try:
        return key.decrypt(message, padding.OAEP(mgf=padding.MGF1(hashes.SHA256()),
                                                 algorithm=hashes.SHA256(), label=None))
    except ValueError:
        raise UsageError(f"{image_path}: wrong key: {key_path} does not open it") from None


def _message(image_path):
    """The RSA-OAEP ciphertext of the SIF's PEM MESSAGE object."""
    import binascii
    from hpcimage.image import sif
    img = sif.open_sif(image_path)
    d = sif.crypto_message(img, img.primary_partition())
    if d is None:
        raise UsageError(f"{image_path}: no PEM key message for its encrypted partition")
    text = img.read_object(d.id, 1 << 20)
    try:
        body = text.split(b"-----BEGIN MESSAGE-----", 1)[1].split(b"-----END", 1)[0]
        der = binascii.a2b_base64(b"".join(ln.strip() for ln in body.splitlines()
                                           if b":" not in ln))
        return _der_octet_string(der)
    except (IndexError, ValueError, binascii.Error):
        raise UsageError(f"{image_path}: its PEM key message is malformed") from None


def _der_octet_string(der):
    if not der or der[0] != 0x04:
        raise ValueError("not an OCTET STRING")
    n = der[1]
    pos = 2
    if n & 0x80:
        k = n & 0x7F
        n = int.from_bytes(der[2:2 + k], "big")
        pos = 2 + k
    if len(der) < pos + n:
        raise ValueError("short")
    return der[pos:pos + n]
