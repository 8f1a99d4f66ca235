"""`hpcimage key newpair|list|import|export|remove|push|search|pull` (issue 18): keyrings in
Apptainer's format, Apptainer's own locations read, the global keyring (root), and an
HKP key server (tests/keyserver.py on 127.0.0.1). Run as the test user."""
import os
import shutil
import stat
import subprocess
import tempfile
from pathlib import Path

import pytest

from conftest import PY, cli_argv, on_terminal
from keyserver import KeyServer

CORPUS_KEY = Path(__file__).resolve().parents[2] / "shared/testdata/sif/keys/private.asc"
CORPUS_KEY = CORPUS_KEY if CORPUS_KEY.exists() else Path("/work/shared/testdata/sif/keys/private.asc")
CORPUS_FPR = "12045C8C0B1004D058DE4BEDA20C27EE7FF7BA84"
GLOBAL = Path("/etc/hpcimage/global-pgp-public")


def key(user, home, *args, env=None, root=False):
    e = {"HOME": str(home)}
    e.update(env or {})
    return user.run(cli_argv("key", *args), env=e, cwd=str(home), root=root)


def ok(r):
    assert r.returncode == 0, r.stderr
    return r.stdout


def one_line_error(r, status, *words):
    assert r.returncode == status, (r.stdout, r.stderr)
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("hpcimage: error: "), r.stderr
    for w in words:
        assert w in r.stderr, r.stderr


def fingerprints(listing):
    return [ln.split()[1] for ln in listing.splitlines() if ln.strip().startswith("F:")]


def gpg_fingerprints(path):
    """What GnuPG itself reads in a keyring file (Apptainer's format: binary OpenPGP)."""
    with tempfile.TemporaryDirectory() as home:
        out = subprocess.run(["gpg", "--homedir", home, "--batch", "--no-autostart",
                              "--with-colons", "--show-keys", str(path)],
                             capture_output=True, text=True, check=True).stdout
    return [ln.split(":")[9] for ln in out.splitlines() if ln.startswith("fpr:")][::2]


@pytest.fixture(scope="module")
def made(user):
    """One key pair made once by `key newpair` as the user (1024 bits): its directory
    (pgp-public, pgp-secret) and fingerprint."""
    base = Path("/tmp/hpcimage-tests")
    base.mkdir(exist_ok=True)
    d = Path(tempfile.mkdtemp(dir=base))
    os.chown(d, user.uid, user.gid)
    r = key(user, d, "newpair", "-N", "Test User", "-E", "test@example.com",
            "-C", "dev keys", "-P", "s3cret", "-b", "1024")
    assert r.returncode == 0, r.stderr
    assert "Generating Entity and OpenPGP Key Pair... done" in r.stdout
    keys = d / ".hpcimage" / "keys"
    fp = fingerprints(ok(key(user, d, "list")))
    assert len(fp) == 1
    yield keys, fp[0]
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def home(user, userdir, made):
    """The user's HOME with a copy of the made key pair in ~/.hpcimage/keys."""
    keys = userdir / ".hpcimage" / "keys"
    shutil.copytree(made[0], keys)
    for p in (userdir / ".hpcimage", keys, *keys.iterdir()):
        os.chown(p, user.uid, user.gid)
    return userdir


def test_newpair_writes_apptainers_format(user, made):
    keys, fp = made
    assert stat.S_IMODE(keys.stat().st_mode) == 0o700
    for name in ("pgp-public", "pgp-secret"):
        assert stat.S_IMODE((keys / name).stat().st_mode) == 0o600
        assert (keys / name).stat().st_uid == user.uid
        assert gpg_fingerprints(keys / name) == [fp]
    assert (keys / "pgp-public").read_bytes()[:1] != b"-"      # binary, not armoured
    # gpg ran in a private home that is gone, its agent with it; ~/.gnupg untouched
    agents = subprocess.run(["pgrep", "-f", "gpg-agent --homedir /tmp/hpcimage-gpg-"],
                            capture_output=True, text=True).stdout
    assert agents == ""
    assert not (keys.parent.parent / ".gnupg").exists()


def test_list_as_apptainer(user, home, made):
    out = ok(key(user, home, "list"))
    keys = home / ".hpcimage" / "keys"
    assert out.startswith(f"Public key listing ({keys}/pgp-public):\n\n0) U: Test User "
                          "(dev keys) <test@example.com>\n   C: ")
    assert f"   F: {made[1]}\n   L: 1024\n   --------\n" in out
    out = ok(key(user, home, "list", "--secret"))
    assert out.startswith(f"Private key listing ({keys}/pgp-secret):")
    assert fingerprints(out) == [made[1]]
    # the `keys` alias and an explicit --keysdir
    assert fingerprints(ok(key(user, "/tmp", "list", "-d", str(keys)))) == [made[1]]
    r = user.run(cli_argv("keys", "list"), env={"HOME": str(home),
                                                 "HPCIMAGE_KEYSDIR": str(keys)})
    assert fingerprints(ok(r)) == [made[1]]


def test_newpair_without_a_terminal_needs_the_values(user, userdir):
    r = key(user, userdir, "newpair", "-N", "No Password", "-E", "x@example.com")
    one_line_error(r, 2, "no terminal", "-P/--password")
    assert not (userdir / ".hpcimage").exists()
    r = key(user, userdir, "newpair", "-N", "Bad (name)", "-E", "x@example.com", "-P", "")
    one_line_error(r, 2, "name")
    r = key(user, userdir, "newpair", "-N", "X", "-E", "x@e", "-P", "", "-b", "512")
    one_line_error(r, 2, "1024 to 4096")


@pytest.mark.parametrize("armor", [True, False], ids=["armored", "binary"])
def test_export_import_round_trip(user, home, made, armor):
    fp = made[1]
    keys = home / ".hpcimage" / "keys"
    public, secret = (keys / "pgp-public").read_bytes(), (keys / "pgp-secret").read_bytes()
    flag = ["-a"] if armor else []
    out = ok(key(user, home, "export", *flag, "--fingerprint", fp, str(home / "pub")))
    assert f"Public key with fingerprint {fp} correctly exported to file:" in out
    out = ok(key(user, home, "export", "-s", *flag, "--fingerprint", fp, str(home / "sec")))
    assert out.startswith(f"Private key with fingerprint {fp} correctly exported")
    head = (home / "sec").read_bytes()[:40]
    assert head.startswith(b"-----BEGIN PGP PRIVATE KEY BLOCK-----") == armor
    assert (home / "pub").read_bytes().startswith(b"-----BEGIN PGP PUBLIC KEY BLOCK") == armor
    assert stat.S_IMODE((home / "sec").stat().st_mode) == 0o600
    assert gpg_fingerprints(home / "pub") == [fp]

    ok(key(user, home, "remove", "--both", fp))
    assert fingerprints(ok(key(user, home, "list"))) == []
    assert fingerprints(ok(key(user, home, "list", "-s"))) == []
    out = ok(key(user, home, "import", str(home / "sec")))
    assert out.splitlines() == [
        f"Key with fingerprint {fp} successfully added to the private keyring",
        f"Key with fingerprint {fp} successfully added to the public keyring"]
    assert (keys / "pgp-public").read_bytes() == public
    assert (keys / "pgp-secret").read_bytes() == secret
    # a public key again: Apptainer's error, nothing changed
    r = key(user, home, "import", str(home / "pub"))
    one_line_error(r, 2, f"the key with fingerprint {fp} already belongs to the keyring")
    assert (keys / "pgp-public").read_bytes() == public


def test_remove(user, home, made):
    fp = made[1]
    r = key(user, home, "remove", "0" * 40)
    one_line_error(r, 2, "no key matching fingerprint " + "0" * 40)
    one_line_error(key(user, home, "remove", "xyz"), 2, "40 hex digits")
    ok(key(user, home, "remove", "0x" + fp.lower()))           # public only (default)
    assert fingerprints(ok(key(user, home, "list"))) == []
    assert fingerprints(ok(key(user, home, "list", "-s"))) == [fp]
    ok(key(user, home, "remove", "--private", fp[-16:]))       # a key id works too
    assert fingerprints(ok(key(user, home, "list", "-s"))) == []


def test_export_needs_a_choice_without_a_terminal(user, home, made):
    r = key(user, home, "export", str(home / "out"))
    one_line_error(r, 2, "no terminal", "--fingerprint")
    r = key(user, home, "export", "--fingerprint", "0" * 40, str(home / "out"))
    one_line_error(r, 2, "no key with fingerprint")
    assert not (home / "out").exists()


def test_import_errors(user, userdir):
    (userdir / "junk").write_text("not a key\n")
    one_line_error(key(user, userdir, "import", str(userdir / "junk")), 2, "OpenPGP")
    (userdir / "bin").write_bytes(b"\x99\x01")
    one_line_error(key(user, userdir, "import", str(userdir / "bin")), 2, "truncated")
    one_line_error(key(user, userdir, "import", str(userdir / "none")), 2, "cannot read")
    r = key(user, userdir, "import", "--new-password", str(CORPUS_KEY))
    one_line_error(r, 2, "--new-password", "not supported")
    assert not (userdir / ".hpcimage").exists()


def test_corpus_key_and_apptainers_locations(user, userdir):
    """A key Apptainer's Go code wrote (the sylabs/sif corpus) imports; keyrings in
    Apptainer's own directory are read by hpcimage (public_keyring_files)."""
    shutil.copy(CORPUS_KEY, userdir / "k.asc")
    os.chown(userdir / "k.asc", user.uid, user.gid)
    out = ok(key(user, userdir, "import", str(userdir / "k.asc"),
                 env={"HPCIMAGE_KEYSDIR": str(userdir / "app" / "keys")}))
    assert CORPUS_FPR in out
    listing = ok(key(user, userdir, "list", "-d", str(userdir / "app" / "keys")))
    assert "0) U: Unit Test () <unit@test.com>" in listing
    assert fingerprints(listing) == [CORPUS_FPR]
    probe = ("from hpcimage.signing.keyring import public_keyring_files as p, "
             "secret_keyring_files as s; print(p(False)); print(s())")
    (userdir / ".apptainer").mkdir()
    os.chown(userdir / ".apptainer", user.uid, user.gid)
    r = user.run([PY, "-I", "-c", "import os; os.rename(%r, %r)" % (
        str(userdir / "app" / "keys"), str(userdir / ".apptainer" / "keys"))])
    ok(r)
    out = ok(user.run([PY, "-I", "-c", probe], env={"HOME": str(userdir)}))
    assert out.splitlines() == [str([f"{userdir}/.apptainer/keys/pgp-public"]),
                                str([f"{userdir}/.apptainer/keys/pgp-secret"])]
    out = ok(user.run([PY, "-I", "-c", probe], env={
        "HOME": "/nonexistent", "APPTAINER_KEYSDIR": str(userdir / ".apptainer/keys")}))
    assert f"{userdir}/.apptainer/keys/pgp-public" in out


@pytest.fixture
def global_keyring():
    """/etc/hpcimage/global-pgp-public as it was, put back afterwards."""
    saved = GLOBAL.read_bytes() if GLOBAL.exists() else None
    created_dir = not GLOBAL.parent.exists()
    yield GLOBAL
    if saved is None:
        GLOBAL.unlink(missing_ok=True)
        if created_dir:
            shutil.rmtree(GLOBAL.parent, ignore_errors=True)
    else:
        GLOBAL.write_bytes(saved)


def test_global_keyring(user, home, made, global_keyring):
    fp = made[1]
    ok(key(user, home, "export", "--fingerprint", fp, str(home / "pub")))
    r = key(user, home, "import", "--global", str(home / "pub"))
    one_line_error(r, 2, "only root")
    before = global_keyring.read_bytes() if global_keyring.exists() else b""
    ok(key(user, home, "import", "-g", str(home / "pub"), root=True))
    assert stat.S_IMODE(global_keyring.stat().st_mode) == 0o644
    assert fp in gpg_fingerprints(global_keyring)
    assert fp in fingerprints(ok(key(user, home, "list", "--global")))
    probe = ("from hpcimage.signing.keyring import public_keyring_files as p; "
             "print(p()); print(p(include_global=False))")
    lines = ok(user.run([PY, "-I", "-c", probe], env={"HOME": str(home)})).splitlines()
    assert str(global_keyring) in lines[0] and str(global_keyring) not in lines[1]
    one_line_error(key(user, home, "remove", "-g", fp), 2, "only root")
    one_line_error(key(user, home, "import", "-g", str(home / "pub"), root=True), 2,
                   "already belongs")
    ok(key(user, home, "remove", "-g", fp, root=True))
    assert global_keyring.read_bytes() == before


@pytest.fixture
def server(tmp_path):
    with KeyServer(tmp_path / "keyserver") as ks:
        yield ks


def test_push_search_pull(user, home, made, server, userdir):
    fp = made[1]
    keys = home / ".hpcimage" / "keys"
    out = ok(key(user, home, "push", "-u", server.url, fp))
    assert out == f"public key `{fp}' pushed to server successfully\n"
    assert [k["fpr"] for k in server.keys()] == [fp]
    assert "PRIVATE" not in server.keys()[0]["text"]

    env = {"HPCIMAGE_KEYSERVER": server.url}       # the default server
    out = ok(key(user, home, "search", "Test User", env=env))
    assert out.startswith("Showing 1 results\n\nKEY ID    BITS  NAME/EMAIL\n")
    assert f"{fp[-8:]}  1024  Test User (dev keys) <test@example.com>\n" in out
    out = ok(key(user, home, "search", "-l", fp, env=env))
    assert "FINGERPRINT" in out and f"{fp}  RSA" in out and "[enabled]" in out
    assert ("GET", "/pks/lookup", {"op": "index", "options": "mr",
                                   "search": "0x" + fp}) in server.requests
    one_line_error(key(user, home, "search", "nobody", env=env), 2, "no matching keys")

    fresh = home / "fresh"
    out = ok(key(user, home, "pull", "-u", server.url, "-d", str(fresh), fp))
    assert out == f"1 key(s) added to keyring of trust {fresh}/pgp-public\n"
    assert (fresh / "pgp-public").read_bytes() == (keys / "pgp-public").read_bytes()
    out = ok(key(user, home, "pull", "-d", str(fresh), fp[-8:], env=env))
    assert out.startswith("0 key(s) added")
    r = key(user, home, "pull", "-u", server.url, "-d", str(fresh), "0" * 40)
    one_line_error(r, 2, "no matching keys found for fingerprint")
    one_line_error(key(user, home, "push", "-u", server.url, "0" * 40), 2,
                   "could not find the key")


def test_key_server_errors(user, home, made):
    fp = made[1]
    r = key(user, home, "push", "-u", "http://127.0.0.1:1", fp)
    one_line_error(r, 1, "key server http://127.0.0.1:1 did not answer")
    r = key(user, home, "search", "-u", "http://127.0.0.1:1", "Test")
    one_line_error(r, 1, "did not answer")
    one_line_error(key(user, home, "pull", fp), 2, "no key server", "HPCIMAGE_KEYSERVER")
    one_line_error(key(user, home, "pull", "-u", "ftp://x", fp), 2, "not a key server URL")


def test_newpair_push(user, userdir, server):
    r = key(user, userdir, "newpair", "-N", "Pushed", "-E", "p@example.com", "-P", "",
            "-b", "1024", "--push", env={"HPCIMAGE_KEYSERVER": server.url})
    out = ok(r)
    assert out.endswith("Key successfully pushed to keystore\n")
    assert [k["uids"] for k in server.keys()] == [["Pushed <p@example.com>"]]


def test_keyserver_command_still_refused(user, userdir):
    r = user.run(cli_argv("keyserver", "list"), cwd=str(userdir))
    assert r.returncode == 2 and "keyserver is an Apptainer command" in r.stderr


def _interactive(user, argv, env, cwd, answers, timeout=120):
    """ARGV on a pseudo-terminal, its controlling terminal, answering each prompt of
    ANSWERS [(text awaited, line typed)]; (status, what the terminal showed)."""
    return on_terminal(user, argv, env, cwd, answers, controlling=True, timeout=timeout)


def test_newpair_asks_on_a_terminal(user, userdir):
    rc, tty = _interactive(user, cli_argv("key", "newpair", "-b", "1024"),
                           {"HOME": str(userdir)}, userdir,
                           [("Enter your name (e.g., John Doe) :", "Term User"),
                            ("Enter your email address (e.g., john.doe@example.com) :",
                             "term@example.com"),
                            ("Enter optional comment (e.g., development keys) :", ""),
                            ("Enter a passphrase :", "pw"),
                            ("Retype your passphrase :", "pw")])
    assert rc == 0, tty
    assert "Generating Entity and OpenPGP Key Pair... done" in tty
    assert "pw\r\n" not in tty.replace("<answered>", "")          # not echoed
    out = ok(key(user, userdir, "list", "-s"))
    assert "0) U: Term User () <term@example.com>" in out


def test_import_writes_nothing_when_a_key_is_there(user, home, made):
    """A file with a new key and one the keyring has: refused, neither keyring changed."""
    fp = made[1]
    keys = home / ".hpcimage" / "keys"
    ok(key(user, home, "export", "--fingerprint", fp, str(home / "mine")))
    two = home / "two"
    corpus = subprocess.run(["gpg", "--dearmor"], input=CORPUS_KEY.read_bytes(),
                            capture_output=True, check=True).stdout
    two.write_bytes(corpus + (home / "mine").read_bytes())
    os.chown(two, user.uid, user.gid)
    before = {p.name: p.read_bytes() for p in keys.iterdir()}
    one_line_error(key(user, home, "import", str(two)), 2, "already belongs")
    assert {p.name: p.read_bytes() for p in keys.iterdir()} == before


def test_hkp_urls_and_index_format():
    from hpcimage.signing import hkp
    assert hkp.server_url("hkp://keys.example.org") == "http://keys.example.org:11371"
    assert hkp.server_url("hkps://keys.example.org/") == "https://keys.example.org"
    assert hkp.server_url(None, {"HPCIMAGE_KEYSERVER": "http://h:8/x"}) == "http://h:8/x"
    mr = ("info:1:2\n"
          "pub:AAAABBBBCCCCDDDDEEEEFFFF0000111122223333:1:4096:1600000000::\n"
          "uid:Jane%20Doe%20%3Cjane@example.com%3E:1600000000::\n"
          "uid:Jane%20D.:1600000000::\n"
          "pub:0000111122223333444455556666777788889999:22:256:1600000000::r\n")
    count, text = hkp.format_index(mr)
    assert count == 2
    assert text.splitlines() == ["KEY ID    BITS  NAME/EMAIL",
                                 "22223333  4096  Jane Doe <jane@example.com>",
                                 "                Jane D.",
                                 "",
                                 "88889999  256"]
    count, text = hkp.format_index(mr, long=True)
    assert "[revoked]" in text and "RSA" in text and "unknown" in text
    with pytest.raises(Exception, match="announces 3"):
        hkp.format_index(mr.replace("info:1:2", "info:1:3"))


def test_newpair_checks_everything_before_the_progress_line(user, userdir):
    r = key(user, userdir, "newpair", "-N", "x", "-P", "", "-b", "512")
    one_line_error(r, 2, "--bit-length 512: RSA keys of 1024 to 4096 bits")
    assert r.stdout == ""
    r = key(user, userdir, "newpair", "-N", "a<b", "-P", "")
    one_line_error(r, 2, "may not contain")
    assert r.stdout == ""


def test_sign_with_a_passphrase_protected_key(user, home, made):
    """The made key has the passphrase "s3cret": none, or a wrong one, is bad input
    (exit 2) in one line naming the key, with no temporary path in it."""
    from conftest import TESTDATA
    img = home / "s.sif"
    shutil.copy(TESTDATA / "sif" / "images" / "one-group.sif", img)
    os.chown(img, user.uid, user.gid)
    img.chmod(0o644)
    before = img.read_bytes()

    def sign(env=None):
        e = {"HOME": str(home)}
        e.update(env or {})
        return user.run(cli_argv("sign", "-k", "0", str(img)), env=e, cwd=str(home))

    r = sign()
    one_line_error(r, 2, f"the key {made[1]} is protected by a passphrase: set "
                   "HPCIMAGE_SIGN_PASSPHRASE")
    assert "/tmp" not in r.stderr and "--digest-algo" not in r.stderr
    r = sign({"HPCIMAGE_SIGN_PASSPHRASE": "wrong"})
    one_line_error(r, 2, f"wrong passphrase for key {made[1]}")
    assert img.read_bytes() == before
    r = sign({"HPCIMAGE_SIGN_PASSPHRASE": "s3cret"})
    assert r.returncode == 0, r.stderr
    assert img.read_bytes() != before
    # On a terminal the passphrase is asked for (not echoed), as Apptainer does.
    signed = img.read_bytes()
    rc, tty = _interactive(user, cli_argv("sign", str(img)), {"HOME": str(home)}, home,
                           [("Enter key passphrase :", "s3cret")])
    assert rc == 0, tty
    assert "s3cret" not in tty and f"Signature created and applied to {img}" in tty
    assert len(img.read_bytes()) > len(signed)
