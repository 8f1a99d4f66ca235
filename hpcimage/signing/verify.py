"""`hpcimage verify`: check the signatures of a SIF image as Apptainer's `verify` does
(sylabs/sif pkg/integrity): one task per object group (or the selected group/object),
every non-legacy signature linked to the group checked, the header, each object's
descriptor and data compared with the signed metadata.

PGP signatures are checked by `gpgv` against plain keyring files (it writes nothing);
DSSE signatures with a PEM key (`cryptography`, imported here only). Legacy signatures
(a clear-signed SIFHASH of the data) only with legacy=True.
"""
import base64
import json
import os
import subprocess
import tempfile

from hpcimage.errors import HpcimageError, UsageError
from hpcimage.image import sif
from hpcimage.signing import keyring as _keyring
from hpcimage.signing import sifsig
from hpcimage.signing.sifsig import IntegrityError

DSSE_PAYLOAD_TYPE = "application/vnd.sylabs.sif-metadata+json"


class VerifyFailed(HpcimageError):
    """Verification failed (exit 1); the message is the reference's ("integrity: ...")."""

    def __init__(self, message):
        super().__init__(f"Failed to verify container: integrity: {message}", 1)
        self.reason = message


class Result:
    """One signature checked: its object ID, the objects verified, who signed
    (kind "pgp": entity name and fingerprint; "dsse": the key IDs that verified), the error."""

    __slots__ = ("signature", "kind", "verified", "name", "fingerprint", "key_ids", "error")

    def __init__(self, signature, kind):
        self.signature, self.kind = signature, kind
        self.verified, self.name, self.fingerprint, self.key_ids = [], None, None, []
        self.error = None


# ------------------------------------------------------------------ decoding signatures

def clearsigned_text(raw):
    """The text of a clear-signed message (no check): bytes, or None if not one."""
    if not raw.startswith(b"-----BEGIN PGP SIGNED MESSAGE-----\n"):
        return None
    head, sep, rest = raw.partition(b"\n\n")
    text, sep2, _ = rest.partition(b"\n-----BEGIN PGP SIGNATURE-----")
    if not sep or not sep2:
        return None
    return b"\n".join(ln[2:] if ln.startswith(b"- ") else ln for ln in text.split(b"\n"))


def is_legacy(raw):
    text = clearsigned_text(raw)
    return text is not None and text.startswith(b"SIFHASH:\n")


def dsse_envelope(raw):
    try:
        e = json.loads(raw)
    except ValueError:
        return None
    if isinstance(e, dict) and e.get("payloadType") == DSSE_PAYLOAD_TYPE:
        return e
    return None


def pae(payload_type, payload):
    t = payload_type.encode()
    return b"DSSEv1 %d %s %d %s" % (len(t), t, len(payload), payload)


def signature_kinds(img):
    """The kinds of the signatures of IMG: a subset of {"pgp", "dsse"} (legacy: pgp)."""
    return {"dsse" if dsse_envelope(img.read_object(d.id)) is not None else "pgp"
            for d in img.descriptors if d.data_type == sif.DATA_SIGNATURE}


# ------------------------------------------------------------------ key material

class PgpKeys:
    """Plain OpenPGP keyring files for gpgv (armoured ones are de-armoured first)."""

    def __init__(self, files):
        self.files = list(files)
        self._tmp = None

    def __enter__(self):
        self._tmp = tempfile.TemporaryDirectory(prefix="hpcimage-gpgv-")
        rings = []
        for i, f in enumerate(self.files):
            try:
                with open(f, "rb") as fh:
                    data = fh.read()
            except OSError as e:
                raise UsageError(f"{f}: cannot read keyring: {e.strerror}") from None
            if data.lstrip().startswith(b"-----BEGIN PGP"):
                data = dearmor(data, f)
            path = os.path.join(self._tmp.name, f"ring{i}.gpg")
            with open(path, "wb") as fh:
                fh.write(data)
            rings.append(path)
        self.rings = rings
        return self

    def __exit__(self, *exc):
        self._tmp.cleanup()
        return False

    def check(self, raw):
        """gpgv on a clear-signed message: (plaintext, name, primary fingerprint hex);
        IntegrityError when it is not a good signature from a key of the keyrings."""
        if not self.rings:
            raise IntegrityError("key material not provided")
        home = os.path.join(self._tmp.name, "home")
        os.makedirs(home, mode=0o700, exist_ok=True)
        cmd = ["gpgv", "--homedir", home, "--status-fd", "2", "--output", "-"]
        for r in self.rings:
            cmd += ["--keyring", r]
        try:
            p = subprocess.run(cmd + ["-"], input=raw, capture_output=True)
        except FileNotFoundError:
            raise HpcimageError("gpgv not found: install GnuPG's gpgv to check PGP "
                                "signatures") from None
        status = [ln.split()[1:] for ln in p.stderr.decode(errors="replace").splitlines()
                  if ln.startswith("[GNUPG:] ") and len(ln.split()) > 1]
        kinds = {s[0]: s[1:] for s in status}
        if p.returncode == 0 and "VALIDSIG" in kinds and "GOODSIG" in kinds:
            good = kinds["GOODSIG"]
            return p.stdout, " ".join(good[1:]), kinds["VALIDSIG"][-1].upper()
        if "NO_PUBKEY" in kinds:
            raise IntegrityError(f"openpgp: signature made by unknown entity "
                                 f"(key {kinds['NO_PUBKEY'][0]} is in no keyring given)")
        if "BADSIG" in kinds:
            raise IntegrityError("openpgp: invalid signature: hash tag doesn't match")
        raise IntegrityError("openpgp: signature not valid")


def check_keyrings(files):
    """Refuse (exit 2) a keyring file given by the user that holds no OpenPGP key, as
    `key import` does: a text file or /dev/null is no keyring."""
    for f in files:
        try:
            with open(f, "rb") as fh:
                data = fh.read()
        except OSError as e:
            raise UsageError(f"{f}: cannot read keyring: {e.strerror}") from None
        try:
            if data[:1] and not data[0] & 0x80:
                data = _keyring.dearmor(data.decode("utf-8", "replace"))
            keys = _keyring.split(data)
        except UsageError as e:
            raise UsageError(f"{f}: {e.message}") from None
        if not keys:
            raise UsageError(f"{f}: no OpenPGP data (no key in it)")


def dearmor(data, what="keyring"):
    lines = data.decode("ascii", "replace").splitlines()
    try:
        start = next(i for i, ln in enumerate(lines) if ln.startswith("-----BEGIN PGP"))
        body, i = [], start + 1
        while lines[i].strip():             # armour headers
            if ":" not in lines[i]:
                break
            i += 1
        for ln in lines[i:]:
            ln = ln.strip()
            if ln.startswith("-----END") or ln.startswith("="):
                break
            body.append(ln)
        return base64.b64decode("".join(body), validate=True)
    except (StopIteration, IndexError, ValueError):
        raise UsageError(f"{what}: not an OpenPGP keyring (bad armour)") from None


def load_pem_public(path):
    """A PEM file (public key, or private key whose public half is used) -> public key."""
    from cryptography.hazmat.primitives import serialization
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise UsageError(f"{path}: cannot read key: {e.strerror}") from None
    try:
        if b"PRIVATE KEY" in data:
            return serialization.load_pem_private_key(data, None).public_key()
        return serialization.load_pem_public_key(data)
    except (ValueError, TypeError) as e:
        raise UsageError(f"{path}: not a PEM key: {e}") from None


def key_id(pub):
    """The DSSE key ID: SHA256 of the OpenSSH wire form, as `ssh-keygen -l` prints it."""
    import hashlib
    from cryptography.hazmat.primitives import serialization
    ssh = pub.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    wire = base64.b64decode(ssh.split()[1])
    return "SHA256:" + base64.b64encode(hashlib.sha256(wire).digest()).decode().rstrip("=")


def _verify_raw(pub, sig, msg):
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
    try:
        if isinstance(pub, ed25519.Ed25519PublicKey):
            pub.verify(sig, msg)
        elif isinstance(pub, ec.EllipticCurvePublicKey):
            pub.verify(sig, msg, ec.ECDSA(hashes.SHA256()))
        elif isinstance(pub, rsa.RSAPublicKey):
            pub.verify(sig, msg, padding.PKCS1v15(), hashes.SHA256())
        else:
            return False
        return True
    except InvalidSignature:
        return False


class PemKey:
    def __init__(self, path):
        self.path = path
        self.pub = load_pem_public(path)
        self.key_id = key_id(self.pub)

    def check(self, envelope):
        """(payload, [key ids that verified]); IntegrityError when none did."""
        try:
            payload = base64.b64decode(envelope["payload"], validate=True)
            sigs = envelope["signatures"]
            msg = pae(envelope["payloadType"], payload)
            ok = [s.get("keyid", "") for s in sigs
                  if _verify_raw(self.pub, base64.b64decode(s["sig"]), msg)]
        except (KeyError, TypeError, ValueError, AttributeError):
            raise IntegrityError("dsse: envelope malformed") from None
        if not ok:
            raise IntegrityError("dsse: verify envelope failed: no valid signature "
                                 f"from key {self.key_id}")
        return payload, [self.key_id]


# ------------------------------------------------------------------ the tasks

def _signatures_of_group(img, group_id, legacy):
    out = []
    for d in img.descriptors:
        lid, is_group = d.linked_id
        if d.data_type == sif.DATA_SIGNATURE and is_group and lid == group_id:
            if is_legacy(img.read_object(d.id)) == legacy:
                out.append(d)
    if not out:
        raise IntegrityError(f"signature not found for object group {group_id}")
    return out


def _signatures_of_object(img, object_id):
    out = [d for d in img.descriptors if d.data_type == sif.DATA_SIGNATURE
           and d.linked_id == (object_id, False)]
    if not out:
        raise IntegrityError(f"signature not found for object {object_id}")
    return out


def _check_signature(img, sig, group_id, ods, subset_ok, keys):
    r = Result(sig.id, "pgp")
    raw = img.read_object(sig.id)
    env = dsse_envelope(raw)
    try:
        if isinstance(keys, PemKey):
            r.kind = "dsse"
            if env is None:
                raise IntegrityError(f"signature object {sig.id} not valid: not a DSSE "
                                     "signature (a PGP one: verify without --key)")
            try:
                payload, r.key_ids = keys.check(env)
            except IntegrityError as e:
                raise IntegrityError(f"signature object {sig.id} not valid: {e}") from None
        else:
            if env is not None:
                raise IntegrityError(f"signature object {sig.id} not valid: a DSSE "
                                     "signature: verify it with --key PEM")
            payload = _pgp_checked(sig, raw, keys, r)
        r.verified, err = sifsig.check_metadata(img, group_id, ods, payload, subset_ok)
        if err is not None:
            raise err
    except IntegrityError as e:
        r.error = str(e)
    return r


def _pgp_checked(sig, raw, keys, r):
    """The clear-signed text of signature object sig (raw: its data) once keys.check
    accepted it; r gets the signer's name and fingerprint, which must be the one the
    descriptor names. Raises IntegrityError."""
    try:
        text, r.name, r.fingerprint = keys.check(raw)
    except IntegrityError as e:
        raise IntegrityError(f"signature object {sig.id} not valid: {e}") from None
    fp = sig.fingerprint
    if fp is None or fp.hex().upper() != r.fingerprint:
        raise IntegrityError("fingerprint in descriptor does not correspond to "
                             "signing entity")
    return text


def _check_legacy(img, sig, ods, keys, object_id=None):
    r = Result(sig.id, "legacy")
    raw = img.read_object(sig.id)
    try:
        text = _pgp_checked(sig, raw, keys, r)
        name = sifsig.HASH_CODES.get(sig.hash_type)
        if name is None:
            raise IntegrityError("hash algorithm unsupported")
        value = text.removeprefix(b"SIFHASH:\n").rstrip(b"\n")
        try:
            want = bytes.fromhex(value.decode())
        except ValueError:
            raise IntegrityError("digest malformed") from None
        h = sifsig.HASHES[name]()
        for d in ods:
            img.copy_object(d.id, h.update, chunk_size=8 << 20)
        if h.digest() != want:
            raise IntegrityError(f"data object integrity compromised: {object_id}"
                                 if object_id else "data object integrity compromised")
        r.verified = [d.id for d in ods]
    except IntegrityError as e:
        r.error = str(e)
    return r


def verify(path, key=None, keyrings=None, group=None, object_id=None, all_objects=False,
           legacy=False, callback=None):
    """Verify the SIF at PATH; calls CALLBACK(img, result) for each signature checked.
    key: a PEM file (DSSE); else keyrings (default: the user's and the global public
    keyrings). Returns the results; raises VerifyFailed at the first failure."""
    img = sif.SifImage.open(path)
    if group is not None and object_id is not None:
        raise UsageError("only one of -g/--group-id and -i/--sif-id may be given")
    if all_objects and (group is not None or object_id is not None):
        raise UsageError("'--all' not compatible with '--sif-id' or '--group-id'")
    if group == 0:
        raise UsageError("invalid group id 0")
    if object_id == 0:
        raise UsageError("invalid descriptor id 0")
    if key is not None:
        keys = PemKey(key)
    else:
        if keyrings:
            check_keyrings(keyrings)
        files = keyrings if keyrings else _keyring.public_keyring_files()
        keys = PgpKeys(files)
    results = []
    with (keys if isinstance(keys, PgpKeys) else _nullctx(keys)):
        try:
            for d in img.descriptors:
                if d.group_id == 0 and d.data_type != sif.DATA_SIGNATURE:
                    raise IntegrityError("non-signature object not associated with "
                                         "object group")
            groups = [group] if group is not None else []
            objects = [object_id] if object_id is not None else []
            if legacy and all_objects:
                objects = [d.id for d in img.descriptors
                           if d.data_type != sif.DATA_SIGNATURE and d.group_id]
            if not groups and not objects:
                groups = sifsig.group_ids(img)
                if not groups:
                    raise IntegrityError("no groups found")
            for gid in groups:
                ods = sifsig.group_objects(img, gid)
                if legacy:
                    ods = [d for d in ods if d.data_type != sif.DATA_SIGNATURE]
                    rs = [_check_legacy(img, s, ods, keys)
                          for s in _signatures_of_group(img, gid, True)]
                else:
                    rs = (_check_signature(img, s, gid, ods, False, keys)
                          for s in _signatures_of_group(img, gid, False))
                _collect(img, rs, results, callback)
            for oid in objects:
                od = img.descriptor(oid)
                if od.group_id == 0 and not legacy:
                    # Apptainer: "signature not found" (the search in group 0).
                    raise IntegrityError(f"signature not found for object {oid}")
                if legacy:
                    rs = (_check_legacy(img, s, [od], keys, oid)
                          for s in _signatures_of_object(img, oid))
                else:
                    rs = (_check_signature(img, s, od.group_id, [od], True, keys)
                          for s in _signatures_of_group(img, od.group_id, False))
                _collect(img, rs, results, callback)
        except IntegrityError as e:
            raise VerifyFailed(str(e)) from None
    return results


class _nullctx:
    def __init__(self, v):
        self.v = v

    def __enter__(self):
        return self.v

    def __exit__(self, *exc):
        return False


def _collect(img, rs, results, callback):
    for r in rs:
        results.append(r)
        if callback is not None:
            callback(img, r)
        if r.error:
            raise VerifyFailed(r.error)


# ------------------------------------------------------------------ the report

def report(img, r, write):
    """Apptainer's outputVerify for one signature."""
    if r.kind == "dsse":
        for k in r.key_ids:
            write(f"{'[PEM]':<9} Key ID: {k}\n")
    elif r.fingerprint:
        write(f"{'[LOCAL]':<9} Signing entity: {r.name}\n")
        write(f"{'[LOCAL]':<9} Fingerprint: {r.fingerprint}\n")
    if r.verified:
        write("Objects verified:\n")
        write("%-4s|%-8s|%-8s|%s\n" % ("ID", "GROUP", "LINK", "TYPE"))
        write("-" * 48 + "\n")
        for oid in r.verified:
            d = img.descriptor(oid)
            group = str(d.group_id) if d.group_id else "NONE"
            lid, is_group = d.linked_id
            link = "NONE" if lid == 0 else f"{lid} (G)" if is_group else str(lid)
            write("%-4d|%-8s|%-8s|%s\n" % (oid, group, link, d.data_type_name))
    if r.error:
        write(f"\nError encountered during signature verification: {r.error}\n")


def json_entry(img, r):
    """The entries of Apptainer's `verify --json` for one signature (one per object)."""
    out = []
    for oid in (r.verified or [None]):
        d = img.descriptor(oid) if oid else None
        out.append({"Signer": {
            "Partition": (d.fstype_name if d is not None and d.data_type == sif.DATA_PARTITION
                          else d.data_type_name if d is not None else ""),
            "Name": r.name or (r.key_ids[0] if r.key_ids else "unknown"),
            "Fingerprint": (r.fingerprint or "").lower(),
            "KeyLocal": r.fingerprint is not None or bool(r.key_ids),
            "KeyCheck": r.fingerprint is not None or bool(r.key_ids),
            "DataCheck": r.error is None}})
    return out
