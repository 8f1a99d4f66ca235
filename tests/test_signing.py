"""hpcimage verify / sign (issue 18): the corpus's signatures, tampering, wrong keys,
signing hpcimage-built SIFs with PGP and DSSE keys, the atomic append."""
import json
import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

from conftest import PY, TESTDATA, cli_argv

SIFDATA = TESTDATA / "sif"
IMAGES, KEYS = SIFDATA / "images", SIFDATA / "keys"
FPR = "12045C8C0B1004D058DE4BEDA20C27EE7FF7BA84"

pytestmark = pytest.mark.skipif(not (KEYS / "private.asc").exists(),
                                reason=f"SIF corpus with keys absent ({SIFDATA})")


def hpcimage(user, *args, **kw):
    return user.run(cli_argv(*map(str, args)), **kw)


@pytest.fixture(scope="module")
def rings():
    """The corpus's OpenPGP key as binary public and secret keyrings (readable by all)."""
    import tempfile
    base = Path("/tmp/hpcimage-tests")
    base.mkdir(exist_ok=True)
    base.chmod(0o755)
    d = Path(tempfile.mkdtemp(dir=base, prefix="rings-"))
    home = d / "gnupg"
    home.mkdir(mode=0o700)
    gpg = ["gpg", "--homedir", str(home), "--batch", "--quiet"]
    subprocess.run(gpg + ["--import", str(KEYS / "private.asc")], check=True)
    pub, sec = d / "pgp-public", d / "pgp-secret"
    pub.write_bytes(subprocess.run(gpg + ["--export"], check=True, capture_output=True).stdout)
    sec.write_bytes(subprocess.run(gpg + ["--export-secret-keys"], check=True,
                                   capture_output=True).stdout)
    os.chmod(d, 0o755)
    for p in (pub, sec):
        p.chmod(0o644)
    yield pub, sec
    shutil.rmtree(d, ignore_errors=True)


def _signatures():
    from hpcimage.image import sif
    from hpcimage.signing.verify import is_legacy
    out = []
    for p in sorted(IMAGES.glob("*signed*.sif")):
        img = sif.SifImage.open(p)
        for d in img.descriptors:
            if d.data_type == sif.DATA_SIGNATURE:
                raw = img.read_object(d.id)
                lid, is_group = d.linked_id
                out.append((p.name, d.id, lid, is_group, is_legacy(raw), raw.startswith(b"{")))
    return out


def test_metadata_is_the_references_byte_for_byte():
    import base64
    from hpcimage.image import sif
    from hpcimage.signing import sifsig, verify
    n = 0
    for name, sid, lid, is_group, legacy, dsse in _signatures():
        if legacy:
            continue
        img = sif.SifImage.open(IMAGES / name)
        raw = img.read_object(sid)
        signed = (base64.b64decode(json.loads(raw)["payload"]) if dsse
                  else verify.clearsigned_text(raw))
        assert sifsig.image_metadata(img, lid, sifsig.group_objects(img, lid)) == signed
        n += 1
    assert n == 6


@pytest.mark.parametrize("sig", _signatures() if (KEYS / "private.asc").exists() else [],
                         ids=lambda s: f"{s[0]}:{s[1]}")
def test_every_corpus_signature_verifies(user, rings, sig):
    name, sid, lid, is_group, legacy, dsse = sig
    args = ["-g" if is_group else "-i", lid]
    if legacy:
        args.append("--legacy-insecure")
    keys = ([["--key", KEYS / f"{k}-public.pem"] for k in ("ed25519", "rsa")] if dsse
            else [["--keyring", rings[0]]])
    for key in keys:
        r = hpcimage(user, "verify", *key, *args, IMAGES / name)
        assert r.returncode == 0, r.stderr
        assert r.stdout.startswith(f"Verifying image: {IMAGES / name}\n")
        assert r.stdout.endswith(f"Container verified: {IMAGES / name}\n")
        if not dsse:
            assert f"Fingerprint: {FPR}" in r.stdout


def test_report_is_apptainers(user, rings):
    img = IMAGES / "one-group-signed-pgp.sif"
    r = hpcimage(user, "verify", "--keyring", rings[0], img)
    assert r.stdout == (
        f"Verifying image: {img}\n"
        "[LOCAL]   Signing entity: Unit Test <unit@test.com>\n"
        f"[LOCAL]   Fingerprint: {FPR}\n"
        "Objects verified:\n"
        "ID  |GROUP   |LINK    |TYPE\n"
        "------------------------------------------------\n"
        "1   |1       |NONE    |FS\n"
        "2   |1       |NONE    |FS\n"
        f"Container verified: {img}\n")
    j = hpcimage(user, "verify", "--json", "--keyring", rings[0], img)
    assert j.returncode == 0
    data = json.loads(j.stdout)
    assert data["Signatures"] == 1 and len(data["SignerKeys"]) == 2
    assert data["SignerKeys"][0]["Signer"]["Fingerprint"] == FPR.lower()
    assert data["SignerKeys"][0]["Signer"]["DataCheck"] is True


def test_legacy_needs_the_flag(user, rings):
    r = hpcimage(user, "verify", "--keyring", rings[0], IMAGES / "one-group-signed-legacy.sif")
    assert r.returncode == 1
    assert r.stderr == ("hpcimage: error: Failed to verify container: integrity: signature "
                        "not found for object group 1\n")


def test_unsigned_image(user, rings):
    r = hpcimage(user, "verify", "--keyring", rings[0], IMAGES / "one-group.sif")
    assert r.returncode == 1 and "signature not found for object group 1" in r.stderr


@pytest.mark.parametrize("what,offset,message", [
    ("object 1 data", 32768, "data object integrity compromised: 1"),
    ("object 2 data", 36864 + 100, "data object integrity compromised: 2"),
    ("header uuid", 48 + 3, "header integrity compromised"),
    ("descriptor 2 uid", 4096 + 585 + 61, "data object descriptor integrity compromised: 2"),
])
def test_a_changed_byte_names_the_object(user, rings, userdir, what, offset, message):
    for name, key in (("one-group-signed-pgp.sif", ["--keyring", rings[0]]),
                      ("one-group-signed-dsse.sif", ["--key", KEYS / "ed25519-public.pem"])):
        img = userdir / name
        data = bytearray((IMAGES / name).read_bytes())
        data[offset] ^= 0x01
        img.write_bytes(bytes(data))
        r = hpcimage(user, "verify", *key, img)
        assert r.returncode == 1, (what, r.stdout)
        assert r.stderr == f"hpcimage: error: Failed to verify container: integrity: {message}\n"
        assert f"Error encountered during signature verification: {message}" in r.stdout


def test_wrong_key(user, rings, userdir):
    r = hpcimage(user, "verify", "--key", KEYS / "ecdsa-public.pem",
                 IMAGES / "one-group-signed-dsse.sif")
    assert r.returncode == 1
    assert "signature object 3 not valid: dsse: verify envelope failed" in r.stderr
    # A PGP signature with another key's keyring.
    other = _other_keyring(userdir)
    r = hpcimage(user, "verify", "--keyring", other, IMAGES / "one-group-signed-pgp.sif")
    assert r.returncode == 1
    assert "signature object 3 not valid: openpgp: signature made by unknown entity" in r.stderr
    # A PGP signature checked with a PEM key, and the reverse.
    r = hpcimage(user, "verify", "--key", KEYS / "rsa-public.pem",
                 IMAGES / "one-group-signed-pgp.sif")
    assert r.returncode == 1 and "not a DSSE signature" in r.stderr
    r = hpcimage(user, "verify", "--keyring", rings[0], IMAGES / "one-group-signed-dsse.sif")
    assert r.returncode == 1 and "verify it with --key PEM" in r.stderr


def test_bad_input_is_exit_2(user, rings, userdir):
    img = IMAGES / "one-group-signed-pgp.sif"
    for args, msg in ((["-g", 1, "-i", 1], "only one of -g/--group-id and -i/--sif-id"),
                      (["--all", "-g", 1], "'--all' not compatible"),
                      (["-g", 0], "invalid group id 0"),
                      (["--key", userdir / "missing.pem"], "cannot read key"),
                      (["--key", img], "not a PEM key")):
        r = hpcimage(user, "verify", *args, img)
        assert r.returncode == 2, (args, r.stderr)
        assert msg in r.stderr and r.stderr.count("\n") == 1
    r = hpcimage(user, "verify", "--keyring", rings[0], userdir / "nope.sif")
    assert r.returncode == 2 and "no such file" in r.stderr


def test_no_keys_at_all(user, userdir):
    r = hpcimage(user, "verify", IMAGES / "one-group-signed-pgp.sif",
                 env={"HPCIMAGE_KEYSDIR": str(userdir / "k"),
                      "APPTAINER_KEYSDIR": str(userdir / "a")})
    assert r.returncode == 1 and "key material not provided" in r.stderr


@pytest.mark.parametrize("kind", ["pgp", "ed25519", "ecdsa", "rsa"])
def test_sign_an_hpcimage_built_sif_and_verify(user, rings, userdir, demo_sif, kind):
    img = userdir / "demo.sif"
    shutil.copy(demo_sif, img)
    os.chown(img, user.uid, user.gid)
    if kind == "pgp":
        keysdir = userdir / "keys"
        keysdir.mkdir()
        shutil.copy(rings[1], keysdir / "pgp-secret")
        shutil.copy(rings[0], keysdir / "pgp-public")
        subprocess.run(["chown", "-R", f"{user.uid}:{user.gid}", keysdir], check=True)
        env = {"HPCIMAGE_KEYSDIR": str(keysdir)}
        sign, check = [], []
    else:
        env = {}
        sign = ["--key", KEYS / f"{kind}-private.pem"]
        check = ["--key", KEYS / f"{kind}-public.pem"]
    r = hpcimage(user, "sign", *sign, img, env=env)
    assert r.returncode == 0, r.stderr
    assert r.stdout == f"Signing image: {img}\nSignature created and applied to {img}\n"
    r = hpcimage(user, "verify", *check, img, env=env)
    assert r.returncode == 0, r.stderr + r.stdout
    assert "|FS\n" in r.stdout and r.stdout.endswith(f"Container verified: {img}\n")
    listing = hpcimage(user, "sif", "list", img).stdout
    assert "|NONE    |1   (G) |" in listing and "|Signature (SHA-256)" in listing
    # The image still runs, and a changed byte of its SquashFS is found.
    from hpcimage.image import sif
    d = sif.SifImage.open(img).primary_partition()
    with open(img, "r+b") as f:
        f.seek(d.offset + d.size - 1)
        b = f.read(1)
        f.seek(d.offset + d.size - 1)
        f.write(bytes([b[0] ^ 1]))
    r = hpcimage(user, "verify", *check, img, env=env)
    assert r.returncode == 1
    assert f"data object integrity compromised: {d.id}" in r.stderr


def test_sign_is_atomic_and_errors(user, userdir, rings):
    img = userdir / "g.sif"
    shutil.copy(IMAGES / "one-group.sif", img)
    os.chown(img, user.uid, user.gid)
    img.chmod(0o644)
    before = img.read_bytes()
    env = {"HPCIMAGE_KEYSDIR": str(userdir / "none"), "APPTAINER_KEYSDIR": str(userdir / "no")}
    r = hpcimage(user, "sign", img, env=env)
    assert r.returncode == 2 and "no secret keyring" in r.stderr
    r = hpcimage(user, "sign", "--key", KEYS / "ed25519-public.pem", img)
    assert r.returncode == 2 and "not an unencrypted PEM private key" in r.stderr
    r = hpcimage(user, "sign", "--key", KEYS / "ed25519-private.pem", "-i", 9, img)
    assert r.returncode == 2 and "no object with ID 9" in r.stderr
    assert img.read_bytes() == before
    assert sorted(os.listdir(userdir)) == ["g.sif"]       # no temporary file left
    # The directory is not writable: nothing changes, one line, exit 1.
    os.chmod(userdir, 0o555)
    try:
        r = hpcimage(user, "sign", "--key", KEYS / "ed25519-private.pem", img)
    finally:
        os.chmod(userdir, 0o755)
    assert r.returncode == 1 and r.stderr.count("\n") == 1, r.stderr
    assert "cannot add an object" in r.stderr and img.read_bytes() == before
    # -i signs one object; verifying that object passes, the whole group does not.
    r = hpcimage(user, "sign", "--key", KEYS / "ed25519-private.pem", "-i", 2, img)
    assert r.returncode == 0, r.stderr
    pub = ["--key", KEYS / "ed25519-public.pem"]
    assert hpcimage(user, "verify", *pub, "-i", 2, img).returncode == 0
    r = hpcimage(user, "verify", *pub, img)
    assert r.returncode == 1 and "object 1: object not signed" in r.stderr


def test_has_signatures():
    from hpcimage.image import sif
    assert sif.has_signatures(IMAGES / "one-group-signed-pgp.sif")
    assert not sif.has_signatures(IMAGES / "one-group.sif")


def _other_keyring(userdir):
    """A public keyring with another key than the corpus's (readable by the user)."""
    home = userdir / "g"
    home.mkdir(mode=0o700)
    subprocess.run(["gpg", "--homedir", home, "--batch", "--quiet", "--pinentry-mode",
                    "loopback", "--passphrase", "", "--quick-gen-key", "Other <o@x>",
                    "ed25519", "sign", "never"], check=True)
    other = userdir / "other.gpg"
    other.write_bytes(subprocess.run(["gpg", "--homedir", home, "--export"],
                                     capture_output=True, check=True).stdout)
    other.chmod(0o644)
    return other


def test_a_read_only_image_is_not_changed(user, userdir):
    """As Apptainer, which opens the image for writing: a SIF the user may not write is
    refused even where the directory is writable (sign, and the partition append)."""
    img = userdir / "ro.sif"
    shutil.copy(IMAGES / "one-group.sif", img)
    os.chown(img, user.uid, user.gid)
    img.chmod(0o444)
    before = img.read_bytes()
    r = hpcimage(user, "sign", "--key", KEYS / "ed25519-private.pem", img)
    assert r.returncode == 1 and r.stderr.count("\n") == 1, r.stderr
    assert f"{img}: cannot open for writing: Permission denied" in r.stderr
    assert r.stdout == f"Signing image: {img}\n"
    part = userdir / "part"
    part.write_bytes(b"x" * 4096)
    part.chmod(0o644)
    code = ("import sys\nfrom hpcimage.errors import HpcimageError\n"
            "from hpcimage.image import sif\n"
            "try:\n    sif.append_partition(sys.argv[1], sys.argv[2], sif.FS_EXT3, "
            "sif.PART_OVERLAY)\nexcept HpcimageError as e:\n    print(e.status, e)\n")
    r = user.run([PY, "-I", "-c", code, str(img), str(part)])
    assert r.stdout == f"1 {img}: cannot open for writing: Permission denied\n", r.stderr
    assert img.read_bytes() == before and sorted(os.listdir(userdir)) == ["part", "ro.sif"]
    assert stat.S_IMODE(img.stat().st_mode) == 0o444


def test_verify_an_ungrouped_object(user):
    """-i of the signature object itself (in no group): the object is named
    (Apptainer: "signature not found", its search in group 0)."""
    r = hpcimage(user, "verify", "--key", KEYS / "ed25519-public.pem", "-i", 3,
                 IMAGES / "one-group-signed-dsse.sif")
    assert r.returncode == 1
    assert r.stderr == ("hpcimage: error: Failed to verify container: integrity: "
                        "signature not found for object 3\n")


def test_verify_keyring_without_keys_is_refused(user, userdir):
    text = userdir / "notes.txt"
    text.write_text("not a key\n")
    text.chmod(0o644)
    for ring, why in ((text, "no OpenPGP data (neither binary nor ASCII-armoured keys)"),
                      ("/dev/null", "no OpenPGP data (no key in it)")):
        r = hpcimage(user, "verify", "--keyring", ring, IMAGES / "one-group-signed-pgp.sif")
        assert r.returncode == 2 and r.stdout == "", (r.stdout, r.stderr)
        assert r.stderr == f"hpcimage: error: {ring}: {why}\n"


def test_policy_reason_is_the_matching_kinds(userdir):
    """signing: keyring and pem_keys both set, a PGP signature by a key the keyring
    lacks: the keyring's reason, not the PEM key's "not a DSSE signature"."""
    from hpcimage.signing import trust
    other = _other_keyring(userdir)
    rec = trust.record(IMAGES / "one-group-signed-pgp.sif",
                       {"keyring": str(other), "pem_keys": [str(KEYS / "rsa-public.pem")]})
    assert not rec["verified"]
    assert "openpgp: signature made by unknown entity" in rec["reason"], rec
    assert "DSSE" not in rec["reason"]
    rec = trust.record(IMAGES / "one-group-signed-dsse.sif",
                       {"keyring": str(other), "pem_keys": [str(KEYS / "ecdsa-public.pem")]})
    assert "dsse: verify envelope failed" in rec["reason"] and "PGP" not in rec["reason"]
    rec = trust.record(IMAGES / "one-group-signed-dsse.sif", {"keyring": str(other)})
    assert rec["reason"] == "signed with DSSE (pem_keys): the site names no key of that kind"
