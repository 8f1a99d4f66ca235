"""`hpcimage sign`: add signature objects to a SIF, as Apptainer's `sign` does
(sylabs/sif pkg/integrity): one signature per object group by default (or the selected
group, or the selected object), each over the group's signed metadata (sifsig), linked
to the group, hash SHA-256, appended atomically (image.sif.append_object).

PGP: the user's secret keyring imported into a private temporary GNUPGHOME, the JSON
clear-signed by `gpg` with SHA-256; the descriptor carries the primary key's fingerprint.
DSSE: a PEM private key (Ed25519, ECDSA P-256, RSA: `cryptography`), the envelope as
the reference writes it, the descriptor's fingerprint all zeros.
"""
import base64
import json
import os
import subprocess
import sys
import tempfile

from hpcimage.errors import HpcimageError, UsageError
from hpcimage.image import sif
from hpcimage.signing import keyring as _keyring
from hpcimage.signing import sifsig
from hpcimage.signing.verify import DSSE_PAYLOAD_TYPE, key_id, pae

SHA256 = sifsig.CODE_OF_HASH["sha256"]


class PgpSigner:
    """The secret keys of keyring files, in a private temporary GNUPGHOME."""

    def __init__(self, files, keyidx=0, passphrase=None):
        self.files, self.keyidx, self.passphrase = list(files), keyidx, passphrase

    def __enter__(self):
        if not self.files:
            raise UsageError("no secret keyring: none of "
                             f"{', '.join(os.path.join(d, 'pgp-secret') for d in _keyring.keys_dirs())}"
                             " exists (hpcimage key newpair/import)")
        self._tmp = tempfile.TemporaryDirectory(prefix="hpcimage-gpg-")
        self.home = self._tmp.name
        os.chmod(self.home, 0o700)
        for f in self.files:
            if not os.path.isfile(f):
                raise UsageError(f"{f}: no such keyring")
            self._gpg(["--import", f])
        keys = []
        out = self._gpg(["--list-secret-keys", "--with-colons", "--fixed-list-mode"])
        cur = None
        for ln in out.decode(errors="replace").splitlines():
            f = ln.split(":")
            if f[0] == "sec":
                cur = {"algo": f[3], "fpr": None, "uid": ""}
                keys.append(cur)
            elif f[0] == "fpr" and cur is not None and cur["fpr"] is None:
                cur["fpr"] = f[9]
            elif f[0] == "uid" and cur is not None and not cur["uid"]:
                cur["uid"] = f[9]
        if not keys:
            raise UsageError("no secret key in the keyring(s): "
                             + ", ".join(self.files))
        if not 0 <= self.keyidx < len(keys):
            raise UsageError(f"--keyidx {self.keyidx}: there are {len(keys)} secret key(s) "
                             f"(0..{len(keys) - 1})")
        self.key = keys[self.keyidx]
        return self

    def __exit__(self, *exc):
        self._tmp.cleanup()
        return False

    def _gpg(self, args, what=None):
        cmd = ["gpg", "--homedir", self.home, "--batch", "--quiet", "--no-tty",
               "--pinentry-mode", "loopback", "--passphrase-fd", "0", "--status-fd", "2"]
        # The passphrase on stdin, then (for signing) the message from a file.
        stdin = (self.passphrase or "").encode() + b"\n"
        try:
            p = subprocess.run(cmd + args, input=stdin, capture_output=True)
        except FileNotFoundError:
            raise HpcimageError("gpg not found: install GnuPG to sign with PGP keys") from None
        if p.returncode != 0:
            err = p.stderr.decode(errors="replace").replace(self.home + "/", "").splitlines()
            # [GNUPG:] FAILURE <where> <code>: the low 16 bits are gpg-error's code.
            codes = {int(ln.split()[3]) & 0xFFFF for ln in err
                     if ln.startswith("[GNUPG:] FAILURE ") and len(ln.split()) > 3
                     and ln.split()[3].isdigit()}
            fpr = self.key["fpr"] if getattr(self, "key", None) else "?"
            if _NO_PASSPHRASE in codes:
                raise _PassphraseError(f"the key {fpr} is protected by a passphrase: set "
                                       "HPCIMAGE_SIGN_PASSPHRASE")
            if _BAD_PASSPHRASE in codes:
                raise _PassphraseError(f"wrong passphrase for key {fpr}")
            msg = [ln.removeprefix("gpg: ") for ln in err if not ln.startswith("[GNUPG:]")]
            raise HpcimageError(f"gpg ({what or args[0]}) failed: "
                                f"{msg[-1] if msg else p.returncode}")
        return p.stdout

    @property
    def fingerprint(self):
        return bytes.fromhex(self.key["fpr"])

    def sign(self, message):
        msg = os.path.join(self.home, "message")
        with open(msg, "wb") as f:
            f.write(message)
        args = ["--digest-algo", "SHA256", "--local-user", self.key["fpr"],
                "--output", "-", "--clearsign", msg]
        try:
            return self._gpg(args, "clear-sign")
        except _PassphraseError:
            # Asked for on a terminal (no echo), as Apptainer does, once.
            if self.passphrase or not (sys.stdin.isatty() and sys.stderr.isatty()):
                raise
        import getpass
        try:
            self.passphrase = getpass.getpass("Enter key passphrase : ", stream=sys.stderr)
        except (EOFError, KeyboardInterrupt):
            raise UsageError(f"the key {self.key['fpr']}: no passphrase given") from None
        return self._gpg(args, "clear-sign")


# gpg-error codes (gpg-error.h) reported by `gpg --status-fd` FAILURE lines.
_BAD_PASSPHRASE, _NO_PASSPHRASE = 11, 177


class _PassphraseError(UsageError):
    """No passphrase, or a wrong one, for a protected secret key (exit 2)."""


class DsseSigner:
    """A PEM private key."""

    def __init__(self, path):
        from cryptography.hazmat.primitives import serialization
        try:
            with open(path, "rb") as f:
                data = f.read()
        except OSError as e:
            raise UsageError(f"{path}: cannot read key: {e.strerror}") from None
        try:
            self.priv = serialization.load_pem_private_key(data, None)
        except (ValueError, TypeError) as e:
            raise UsageError(f"{path}: not an unencrypted PEM private key: {e}") from None
        from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
        if isinstance(self.priv, ec.EllipticCurvePrivateKey) \
                and self.priv.curve.name != "secp256r1":
            raise UsageError(f"{path}: ECDSA curve {self.priv.curve.name} not supported "
                             "(P-256 only)")
        if not isinstance(self.priv, (ed25519.Ed25519PrivateKey,
                                      ec.EllipticCurvePrivateKey, rsa.RSAPrivateKey)):
            raise UsageError(f"{path}: key type not supported (Ed25519, ECDSA P-256, RSA)")
        self.key_id = key_id(self.priv.public_key())
        self.fingerprint = b""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def sign(self, message):
        from cryptography.hazmat.primitives import hashes
        from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding
        m = pae(DSSE_PAYLOAD_TYPE, message)
        if isinstance(self.priv, ed25519.Ed25519PrivateKey):
            sig = self.priv.sign(m)
        elif isinstance(self.priv, ec.EllipticCurvePrivateKey):
            sig = self.priv.sign(m, ec.ECDSA(hashes.SHA256()))
        else:
            sig = self.priv.sign(m, padding.PKCS1v15(), hashes.SHA256())
        env = {"payloadType": DSSE_PAYLOAD_TYPE,
               "payload": base64.b64encode(message).decode(),
               "signatures": [{"keyid": self.key_id, "sig": base64.b64encode(sig).decode()}]}
        return json.dumps(env, separators=(",", ":")).encode() + b"\n"


def plan(img, group=None, object_id=None):
    """[(group id, [descriptors])]: what each signature covers."""
    if group is not None and object_id is not None:
        raise UsageError("only one of -g/--group-id and -i/--sif-id may be given")
    if group is not None:
        if group == 0:
            raise UsageError("invalid group id 0")
        return [(group, sifsig.group_objects(img, group))]
    if object_id is not None:
        if object_id == 0:
            raise UsageError("invalid descriptor id 0")
        d = img.descriptor(object_id)
        if d.group_id == 0:
            raise UsageError(f"object {object_id} is in no object group: it cannot be signed")
        return [(d.group_id, [d])]
    ids = sifsig.group_ids(img)
    if not ids:
        raise UsageError(f"{img.path}: no object groups to sign")
    return [(g, sifsig.group_objects(img, g)) for g in ids]


def sign(path, key=None, keyidx=0, keyrings=None, group=None, object_id=None,
         passphrase=None):
    """Sign the SIF at PATH; returns the new signature objects' IDs.
    key: a PEM private key (DSSE); else the PGP secret key number KEYIDX of KEYRINGS
    (default: the user's secret keyrings)."""
    img = sif.SifImage.open(path)
    tasks = plan(img, group, object_id)
    if key is not None:
        signer = DsseSigner(key)
    else:
        files = keyrings if keyrings is not None else _keyring.secret_keyring_files()
        if passphrase is None:
            passphrase = os.environ.get("HPCIMAGE_SIGN_PASSPHRASE")
        signer = PgpSigner(files, keyidx, passphrase)
    ids = []
    with signer:
        sif.require_writable(path)      # before a passphrase is asked for
        for gid, ods in tasks:
            img = sif.SifImage.open(path)      # the previous signature changed the file
            ods = [img.descriptor(d.id) for d in ods]
            message = sifsig.image_metadata(img, gid, ods)
            data = signer.sign(message)
            ids.append(sif.append_object(path, sif.DATA_SIGNATURE, data,
                                         sif.signature_extra(SHA256, signer.fingerprint),
                                         link=gid, link_group=True))
    return ids
