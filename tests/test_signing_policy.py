"""The site's signature policy (issue 18): site.yaml signing: verify off|warn|require,
trusted signers, `hpcimage publish --sign`, image-update verifying before it installs,
the wrappers refusing or warning as the test user, from the records alone."""
import json
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from conftest import TESTDATA
from test_signing import FPR, KEYS, rings  # noqa: F401  (the corpus's key as keyrings)
from test_store import TESTS, Store, ok, one_error

pytestmark = pytest.mark.skipif(not (KEYS / "private.asc").exists(),
                                reason=f"SIF corpus with keys absent ({TESTDATA / 'sif'})")

OTHER = {"HPCIMAGE_IMAGE": None, "HPCIMAGE_MODULE": "Other/1"}


@pytest.fixture
def site(userdir, user, rings):  # noqa: F811
    TESTS.mkdir(exist_ok=True)
    top = Path(tempfile.mkdtemp(dir=TESTS, prefix="signpol-"))
    top.chmod(0o755)
    s = Store(top, userdir, user)
    s.rings = rings
    s.other = s.dir / "Other-1.sqfs"
    s.local_other = s.local / "Other-1.sqfs"
    yield s
    subprocess.run(["chmod", "-R", "u+rwX", str(top)])
    shutil.rmtree(top, ignore_errors=True)


def policy(s, mode, trusted=(FPR,), sign_key=None, pem_keys=()):
    text = (f"signing:\n  verify: {mode}\n  keyring: {s.rings[0]}\n"
            f"  trusted: [{', '.join(trusted)}]\n")
    if sign_key:
        text += f"  sign_key: {sign_key}\n"
    if pem_keys:
        text += f"  pem_keys: [{', '.join(map(str, pem_keys))}]\n"
    s.write_site(extra=text)


def env(s):
    return dict(OTHER, HPCIMAGE_IMAGE=str(s.other))


def test_require_refuses_an_unsigned_image(site, demo_sif):
    policy(site, "require")
    r = site.publish(demo_sif, "Other", "1")
    assert "is not signed by a key the site trusts (unsigned)" in r.stderr
    cur = site.manifest()["images"]["Other-1.sqfs"]["current"]
    assert cur["signature"] == {"verified": False, "signers": [], "reason": "unsigned"}
    r = site.run_image("true", env=env(site))
    one_error(r, 2, "image-exec", "Other/1: image not signed by a key the site trusts: "
              "unsigned (site policy verify: require)")
    r = site.update(env=env(site))
    one_error(r, 1, "image-update", "unsigned", "the local copy is unchanged")
    assert not site.local_other.exists() and site.temps() == []


def test_warn_runs_with_a_warning(site, demo_sif):
    policy(site, "warn")
    site.publish(demo_sif, "Other", "1")
    r = site.run_image("true", env=env(site))
    assert r.returncode == 0, r.stderr
    assert "image not signed by a key the site trusts: unsigned (site policy verify: warn)" \
        in r.stderr
    r = ok(site.update(env=env(site)))
    assert "image-update: warning: Other/1: image not signed" in r.stderr
    assert site.chosen(env=env(site)) == str(site.local_other)
    r = site.run_image("true", env=env(site))
    assert r.returncode == 0 and "unsigned" in r.stderr


def test_off_costs_nothing_and_says_nothing(site, demo_sif):
    policy(site, "off")
    site.publish(demo_sif, "Other", "1")
    r = site.run_image("true", env=env(site))
    assert (r.returncode, r.stderr) == (0, "")


def test_publish_sign_then_signed_runs(site, demo_sif):
    sec = site.top / "site-secret.gpg"
    shutil.copy(site.rings[1], sec)
    policy(site, "require", sign_key=sec)
    r = site.publish(demo_sif, "Other", "1", "--sign")
    assert r.stderr == ""
    cur = site.manifest()["images"]["Other-1.sqfs"]["current"]
    assert cur["signature"] == {"verified": True, "signers": [FPR], "reason": ""}
    assert cur["source"] == str(demo_sif)
    r = site.run_image("true", env=env(site))
    assert (r.returncode, r.stderr) == (0, ""), r.stderr
    # image-update verifies the copy, records it; the wrappers start the copy.
    ok(site.update(env=env(site)))
    assert site.chosen(env=env(site)) == str(site.local_other)
    r = site.run_image("true", env=env(site))
    assert (r.returncode, r.stderr) == (0, "")
    # The store's file changed behind the manifest: refused, without reading it.
    trust = site.local / ".Other-1.sqfs.hpcimage-trust"
    assert os.readlink(trust).startswith("hpcimage-trust-v1 ")
    os.unlink(trust)
    r = site.run_image("true", env=env(site))
    one_error(r, 2, "image-exec", "its local copy was not verified by image-update")
    shutil.rmtree(site.local)
    os.utime(site.other, ns=(time.time_ns(), time.time_ns()))
    r = site.run_image("true", env=env(site))
    one_error(r, 2, "image-exec", "the store's file is not the one published and verified")
    # The user's own `verify` agrees with the site's.
    r = site.user.run([*__import__("conftest").cli_argv("verify", "--keyring",
                                                        str(site.rings[0]), str(site.other))])
    assert r.returncode == 0 and f"Fingerprint: {FPR}" in r.stdout


def test_require_refuses_a_foreign_signer(site, demo_sif, userdir):
    signed = userdir / "foreign.sif"
    shutil.copy(demo_sif, signed)
    from hpcimage.signing import sign
    sign.sign(signed, key=KEYS / "ed25519-private.pem")
    policy(site, "require", pem_keys=[KEYS / "ed25519-public.pem"])
    r = site.publish(signed, "Other", "1")
    rec = site.manifest()["images"]["Other-1.sqfs"]["current"]["signature"]
    assert rec["verified"] is False and rec["signers"][0].startswith("SHA256:")
    assert "not a signer the site trusts" in rec["reason"]
    r = site.run_image("true", env=env(site))
    one_error(r, 2, "image-exec", "not a signer the site trusts")
    # Trusting the key ID makes it run.
    policy(site, "require", trusted=(rec["signers"][0],),
           pem_keys=[KEYS / "ed25519-public.pem"])
    r = site.publish(signed, "Other", "1")      # the same file: only its record changes
    assert "its signature record is updated (trusted: yes)" in r.stdout
    rec = site.manifest()["images"]["Other-1.sqfs"]["current"]["signature"]
    assert rec["verified"] is True
    r = site.run_image("true", env=env(site))
    assert (r.returncode, r.stderr) == (0, ""), r.stderr


@pytest.mark.parametrize("text, message", [
    ("signing:\n  verify: maybe\n", "must be one of off, warn, require"),
    ("signing:\n  trusted: [abc]\n", "not an OpenPGP fingerprint"),
    ("signing:\n  colour: red\n", "colour"),
])
def test_site_yaml_errors(text, message):
    from hpcimage.config import site as sitemod
    from hpcimage.errors import UsageError
    with pytest.raises(UsageError, match=message):
        sitemod.loads("store: /s\nimages: []\n" + text)


def test_site_json_carries_the_policy():
    from hpcimage.config import site as sitemod
    s = sitemod.loads("store: /s\nimages:\n  - {name: A, version: '1', file: a.sif, "
                      "verify: warn}\nsigning:\n  verify: require\n  keyring: /k\n"
                      f"  trusted: ['{FPR[:20]} {FPR[20:]}']\n")
    p = s.policy()
    assert p["verify"] == "require" and p["image_verify"] == {"A/1": "warn"}
    assert p["signing"] == {"trusted": [FPR], "keyring": "/k"}
    from hpcimage.config.policy import Policy
    assert Policy.from_json(json.loads(json.dumps(p))).image_verify == {"A/1": "warn"}
