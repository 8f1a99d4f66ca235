"""`hpcimage key ...` (alias `keys`): Apptainer's key commands, with its flags. The logic
lives in hpcimage.signing (keyring: the keyrings and gpg; hkp: the key server)."""
import sys

import click

from hpcimage.errors import UsageError

_URL = click.option("-u", "--url", metavar="URL",
                    help="the key server (default: $HPCIMAGE_KEYSERVER)")
_GLOBAL = click.option("-g", "--global", "use_global", is_flag=True,
                       help="the global public keyring (/etc/hpcimage/global-pgp-public); "
                            "import, pull and remove: root only")
_KEYSDIR = click.option("-d", "--keysdir", metavar="DIR",
                        help="the personal keyring directory (default: $HPCIMAGE_KEYSDIR, "
                             "else ~/.hpcimage/keys)")


def _keysdir(value):
    from hpcimage.signing.keyring import keysdir_or_none
    return keysdir_or_none(value)


def _tty():
    return sys.stdin.isatty()


@click.group("key", context_settings={"help_option_names": ["-h", "--help"]})
def key():
    """Manage OpenPGP keys: personal keyrings in Apptainer's format (~/.hpcimage/keys/
    pgp-public, pgp-secret; Apptainer's ~/.apptainer/keys are read too), the global
    keyring, and an HKP key server."""


@key.command("newpair")
@click.option("-N", "--name", help="key owner name")
@click.option("-E", "--email", help="key owner email")
@click.option("-C", "--comment", help="key comment")
@click.option("-P", "--password", help="key password ('' for none)")
@click.option("-b", "--bit-length", "bits", type=int, default=4096, show_default=True,
              help="RSA key length in bits (1024 to 4096)")
@click.option("-U", "--push", is_flag=True,
              help="push the public key to the key server ($HPCIMAGE_KEYSERVER)")
@_KEYSDIR
def newpair(name, email, comment, password, bits, push, keysdir):
    """Create a new key pair. A value not given as an option is asked for on a
    terminal; without a terminal -N (or -E) and -P are needed."""
    from hpcimage.signing import keyring
    keyring.check_bits(bits)            # before asking anything
    if not _tty():
        missing = ["-N/--name or -E/--email"] if name is None and email is None else []
        missing += ["-P/--password"] if password is None else []
        if missing:
            raise UsageError("key newpair: no terminal to ask on: give " +
                             ", ".join(missing) + " (-P '' for a key without a password)")
        name, email, comment = name or "", email or "", comment or ""
    if name is None:
        name = click.prompt("Enter your name (e.g., John Doe) ", default="",
                            show_default=False, prompt_suffix=": ")
    if email is None:
        email = click.prompt("Enter your email address (e.g., john.doe@example.com) ",
                             default="", show_default=False, prompt_suffix=": ")
    if comment is None:
        comment = click.prompt(
            "Enter optional comment (e.g., development keys) ", default="",
            show_default=False, prompt_suffix=": ")
    if password is None:
        password = _ask_password()
    keyring.check_newpair(name, email, comment, bits)   # before the progress line
    click.echo("Generating Entity and OpenPGP Key Pair... ", nl=False)
    try:
        pk = keyring.newpair(name, email, comment, password, bits, _keysdir(keysdir))
    except Exception:
        click.echo("")
        raise
    click.echo("done")
    if push:
        from hpcimage.errors import HpcimageError
        from hpcimage.signing import hkp
        try:
            hkp.add(keyring.armor(pk.data))
        except HpcimageError as e:
            raise HpcimageError(f"the key {pk.fingerprint} was made but not pushed: "
                                f"{e.message}", e.status) from None
        click.echo("Key successfully pushed to keystore")


def _ask_password():
    for _ in range(3):
        p = click.prompt("Enter a passphrase ", hide_input=True, default="",
                         show_default=False, prompt_suffix=": ")
        if not p:
            if click.confirm("WARNING: if there is no password set, your key is not "
                             "secure. Do you want to continue?", default=False):
                return ""
            raise UsageError("empty passphrase")
        if p == click.prompt("Retype your passphrase ", hide_input=True, default="",
                             show_default=False, prompt_suffix=": "):
            return p
        click.echo("Passphrases do not match. Please try again.", err=True)
    raise UsageError("passphrases do not match")


@key.command("list")
@click.option("-s", "--secret", is_flag=True,
              help="list private keys instead of the default which displays public ones")
@_GLOBAL
@_KEYSDIR
def list_(secret, use_global, keysdir):
    """List the keys of the local keyring."""
    from hpcimage.signing import keyring
    click.echo(keyring.list_text(secret, use_global, _keysdir(keysdir)), nl=False)


@key.command("import")
@click.argument("file", type=click.Path(dir_okay=False))
@click.option("--new-password", is_flag=True, hidden=True)
@_GLOBAL
@_KEYSDIR
def import_(file, new_password, use_global, keysdir):
    """Import the keys of FILE (binary or ASCII-armoured): secret keys into the secret
    keyring, every key's public part into the public keyring."""
    from hpcimage.signing import keyring
    if new_password:
        raise UsageError("key import --new-password is not supported by hpcimage "
                         "(change the password with gpg --passwd)")
    if use_global:
        keyring.require_root_for_global("import")
    for line in keyring.import_file(file, use_global, _keysdir(keysdir)):
        click.echo(line)


@key.command("export")
@click.argument("file", type=click.Path(dir_okay=False))
@click.option("-s", "--secret", is_flag=True, help="export a secret key")
@click.option("-a", "--armor", is_flag=True, help="ascii armored format")
@click.option("--fingerprint", metavar="FP",
              help="hpcimage: the key to export (default: chosen from a list on a "
                   "terminal, as Apptainer)")
@_GLOBAL
@_KEYSDIR
def export(file, secret, armor, fingerprint, use_global, keysdir):
    """Export a public (or, -s, secret) key into FILE."""
    from hpcimage.signing import keyring
    kd = _keysdir(keysdir)
    if fingerprint is None:
        ring = (keyring.global_keyring() if use_global and not secret
                else keyring.personal(secret, kd))
        if not ring.keys:
            raise UsageError(f"no key to export: {ring.path} is empty")
        if not _tty():
            raise UsageError("key export: no terminal to choose the key on: name it with "
                             "--fingerprint FP")
        for i, k in enumerate(ring.keys):
            click.echo(keyring.format_key(i, k), nl=False)
        n = click.prompt(f"Enter # of {'private' if secret else 'public'} key to use ",
                         type=click.IntRange(0, len(ring.keys) - 1), prompt_suffix=": ")
        fingerprint = ring.keys[n].fingerprint
    click.echo(keyring.export_key(fingerprint, file, secret, armor, use_global, kd))


@key.command("remove")
@click.argument("fingerprint")
@click.option("-p", "--public", is_flag=True, help="remove public keys only")
@click.option("-r", "--private", is_flag=True, help="remove private keys only")
@click.option("-b", "--both", is_flag=True, help="remove both public and private keys")
@_GLOBAL
@_KEYSDIR
def remove(fingerprint, public, private, both, use_global, keysdir):
    """Remove the key FINGERPRINT from the public keyring (the default), the private
    one, or both."""
    from hpcimage.signing import keyring
    if use_global:
        keyring.require_root_for_global("remove")
    pub = both or public or not private
    priv = both or private
    keyring.remove_key(fingerprint, pub, priv, use_global, _keysdir(keysdir))


@key.command("push")
@click.argument("fingerprint")
@_URL
@_GLOBAL
@_KEYSDIR
def push(fingerprint, url, use_global, keysdir):
    """Send the public key FINGERPRINT (16 or 40 hex digits) to the key server."""
    from hpcimage.signing import hkp, keyring
    fp = keyring.check_fingerprint(fingerprint)
    ring = keyring.global_keyring() if use_global else keyring.personal(False,
                                                                         _keysdir(keysdir))
    k = ring.find(fp)
    if k is None:
        raise UsageError(f"could not find the key {fp} in {ring.path}")
    hkp.add(keyring.armor(k.data), url)
    click.echo(f"public key `{fingerprint}' pushed to server successfully")


@key.command("search")
@click.argument("text")
@_URL
@click.option("-l", "--long-list", "long_list", is_flag=True,
              help="output long list when searching for keys")
def search(text, url, long_list):
    """Search the key server for keys matching TEXT (a name, an email address, a key id
    or a fingerprint)."""
    from hpcimage.signing import hkp
    mr = hkp.index(text, url)
    if mr is None:
        raise UsageError(f"no matching keys found for {text!r}")
    count, table = hkp.format_index(mr, long_list)
    click.echo(f"Showing {count} results\n\n{table}", nl=False)


@key.command("pull")
@click.argument("fingerprint")
@_URL
@_GLOBAL
@_KEYSDIR
def pull(fingerprint, url, use_global, keysdir):
    """Fetch the public key FINGERPRINT (8 or 40 hex digits) from the key server into
    the public keyring."""
    from hpcimage.signing import hkp, keyring
    if use_global:
        keyring.require_root_for_global("pull")
    text = hkp.fetch(fingerprint, url)
    keys = keyring.parse(text.encode(), "the key server's answer")
    if any(k.secret for k in keys):
        raise UsageError("the key server sent a secret key: refused")
    want = fingerprint.upper().removeprefix("0X")
    if not all(k.fingerprint.endswith(want) for k in keys):
        raise UsageError(f"the key server sent a key other than {want}: refused")
    ring = keyring.global_keyring() if use_global else keyring.personal(
        False, _keysdir(keysdir))
    added = keyring.add_keys(ring, keys)
    if added:
        ring.save()
    click.echo(f"{len(added)} key(s) added to keyring of trust {ring.path}")
