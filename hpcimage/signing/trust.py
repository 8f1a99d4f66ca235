"""The site's signature policy (site.yaml `signing:`): is an image signed by a key the
site trusts? `hpcimage publish` records the answer in the store's manifest (the
image's current entry, "signature"), `image-update` checks the copy it installs, and
the wrappers read only that record (hpcimage.runtime.localcopy.signature_problem).

    record(path, signing) -> {"verified": bool, "signers": [...], "reason": str}
"""
import os

from hpcimage.errors import HpcimageError
from hpcimage.image import sif
from hpcimage.signing import keyring as _keyring


def record(path, signing):
    """Verify the image at PATH with the site's keys (signing: site.json's "signing"
    or site.yaml's); trusted when every group verifies with the site's keyring (or the
    global keyrings) or one of its PEM keys, and every signer is in "trusted" (when
    that list is not empty)."""
    from hpcimage.signing import verify as v
    if not sif.is_sif(path):
        return {"verified": False, "signers": [], "reason": "not a SIF image: unsigned"}
    if not sif.has_signatures(path):
        return {"verified": False, "signers": [], "reason": "unsigned"}
    trusted = set(signing.get("trusted") or ())
    kinds = v.signature_kinds(sif.SifImage.open(path))
    attempts = []
    rings = [signing["keyring"]] if signing.get("keyring") else \
        [f for f in _keyring.GLOBAL_PUBLIC if os.path.isfile(f)]
    if rings:
        attempts.append(("pgp", {"keyrings": rings}))
    attempts += [("dsse", {"key": k}) for k in signing.get("pem_keys") or ()]
    if not attempts:
        return {"verified": False, "signers": [],
                "reason": "the site names no key to verify with (signing.keyring, pem_keys)"}
    # Only the key material of the signatures' kind(s) is tried, so that the reason
    # is that material's (a PGP signature by an unknown key: the keyring's "unknown
    # entity", not a PEM key's "not a DSSE signature").
    matching = [a for a in attempts if a[0] in kinds]
    if not matching:
        have = " and ".join("PGP (signing.keyring)" if k == "pgp" else "DSSE (pem_keys)"
                            for k in sorted(kinds))
        return {"verified": False, "signers": [],
                "reason": f"signed with {have}: the site names no key of that kind"}
    reasons = []
    for _, kw in matching:
        try:
            results = v.verify(path, **kw)
        except v.VerifyFailed as e:
            reasons.append(e.reason)
            continue
        except HpcimageError as e:
            reasons.append(e.message)
            continue
        signers = sorted({r.fingerprint for r in results if r.fingerprint}
                         | {k for r in results for k in r.key_ids})
        foreign = [s for s in signers if trusted and s not in trusted]
        if foreign:
            return {"verified": False, "signers": signers,
                    "reason": f"signed by {', '.join(foreign)}, not a signer the site trusts"}
        return {"verified": True, "signers": signers, "reason": ""}
    return {"verified": False, "signers": [],
            "reason": "; ".join(dict.fromkeys(reasons)) or "no signature verified"}


def sign_with_site_key(path, signing):
    """`hpcimage publish --sign`: sign PATH with signing.sign_key (a PEM private key:
    DSSE; else an OpenPGP secret keyring: its first key)."""
    from hpcimage.errors import UsageError
    from hpcimage.signing import sign as s
    key = signing.get("sign_key")
    if not key:
        raise UsageError("publish --sign: site.yaml names no signing.sign_key")
    if not sif.is_sif(path):
        raise UsageError(f"publish --sign: {path} is not a SIF image (only SIF images "
                         "carry signatures)")
    try:
        with open(key, "rb") as f:
            head = f.read(64)
    except OSError as e:
        raise UsageError(f"signing.sign_key {key}: {e.strerror}") from None
    if head.startswith(b"-----BEGIN") and b"PRIVATE KEY" in head:
        return s.sign(path, key=key)
    return s.sign(path, keyrings=[key])
