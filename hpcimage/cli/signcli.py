"""`hpcimage verify` and `hpcimage sign` (the logic: hpcimage.signing)."""
import json
import sys

import click

_ID = click.IntRange(0, 0xFFFFFFFF)


@click.command("verify")
@click.option("--key", type=click.Path(dir_okay=False), metavar="PEM",
              help="verify DSSE signatures with this PEM key (public or private)")
@click.option("--keyring", "keyrings", multiple=True, type=click.Path(dir_okay=False),
              metavar="FILE", help="OpenPGP public keyring to use instead of the "
              "personal and global ones (repeatable)")
@click.option("-g", "--group-id", "group", type=_ID, help="verify objects with the "
              "specified group ID")
@click.option("-i", "--sif-id", "object_id", type=_ID, help="verify object with the "
              "specified ID")
@click.option("-a", "--all", "all_objects", is_flag=True, help="verify all objects")
@click.option("-j", "--json", "as_json", is_flag=True, help="output json")
@click.option("--legacy-insecure", "legacy", is_flag=True,
              help="enable verification of (insecure) legacy signatures")
@click.option("-l", "--local", is_flag=True, hidden=True,
              help="only local keys (always so: hpcimage never asks a key server here)")
@click.argument("image", type=click.Path(dir_okay=False))
def verify(key, keyrings, group, object_id, all_objects, as_json, legacy, local, image):
    """Verify the signatures of a SIF image (Apptainer's report; exit 0 only when every
    selected object verifies)."""
    from hpcimage.signing import verify as v
    if key and keyrings:
        raise click.UsageError("--key and --keyring exclude each other (DSSE or PGP)")
    v.check_keyrings(keyrings)          # before any output
    if as_json:
        entries, count = [], []
        err = None
        try:
            v.verify(image, key=key, keyrings=list(keyrings), group=group,
                     object_id=object_id, all_objects=all_objects, legacy=legacy,
                     callback=lambda img, r: (count.append(r), entries.extend(v.json_entry(img, r))))
        except v.VerifyFailed as e:
            err = e
        sys.stdout.write(json.dumps({"Signatures": len(count), "SignerKeys": entries}, indent=2) + "\n")
        if err is not None:
            raise err
        return
    out = sys.stdout
    out.write(f"Verifying image: {image}\n")
    out.flush()
    v.verify(image, key=key, keyrings=list(keyrings), group=group, object_id=object_id,
             all_objects=all_objects, legacy=legacy,
             callback=lambda img, r: v.report(img, r, out.write))
    out.write(f"Container verified: {image}\n")


@click.command("sign")
@click.option("--key", type=click.Path(dir_okay=False), metavar="PEM",
              help="sign with this PEM private key (DSSE: Ed25519, ECDSA P-256, RSA)")
@click.option("-k", "--keyidx", type=click.IntRange(0), default=0, show_default=True,
              help="the PGP secret key to use (its number in the secret keyring)")
@click.option("--keyring", "keyrings", multiple=True, type=click.Path(dir_okay=False),
              metavar="FILE", help="OpenPGP secret keyring instead of the personal one")
@click.option("-g", "--group-id", "group", type=_ID, help="sign objects with the "
              "specified group ID")
@click.option("-i", "--sif-id", "object_id", type=_ID, help="sign object with the "
              "specified ID")
@click.option("-a", "--all", "all_objects", is_flag=True,
              help="sign every object group (the default)")
@click.argument("image", type=click.Path(dir_okay=False))
def sign(key, keyidx, keyrings, group, object_id, all_objects, image):
    """Add signatures to a SIF image: one per object group (PGP from the secret keyring,
    or DSSE with --key)."""
    from hpcimage.errors import UsageError
    from hpcimage.signing import sign as s
    if key and (keyrings or keyidx):
        raise UsageError("--key (DSSE) excludes --keyidx/--keyring (PGP)")
    if all_objects and (group is not None or object_id is not None):
        raise UsageError("'--all' not compatible with '--sif-id' or '--group-id'")
    sys.stdout.write(f"Signing image: {image}\n")
    sys.stdout.flush()
    s.sign(image, key=key, keyidx=keyidx, keyrings=list(keyrings) or None, group=group,
           object_id=object_id)
    sys.stdout.write(f"Signature created and applied to {image}\n")
