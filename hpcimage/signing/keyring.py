"""Where the OpenPGP keyrings live (the contract shared by `hpcimage sign/verify` and
`hpcimage key`): binary OpenPGP keyrings, as Apptainer keeps them.

    personal   $HPCIMAGE_KEYSDIR, else ~/.hpcimage/keys/: pgp-public, pgp-secret
               $APPTAINER_KEYSDIR, else ~/.apptainer/keys/: read too (a user's existing keys)
    global     /etc/hpcimage/global-pgp-public, /etc/apptainer/global-pgp-public,
               /usr/local/etc/apptainer/global-pgp-public
"""
import os

GLOBAL_PUBLIC = ("/etc/hpcimage/global-pgp-public",
                 "/etc/apptainer/global-pgp-public",
                 "/usr/local/etc/apptainer/global-pgp-public")


def keys_dirs(environ=None):
    """The personal key directories, hpcimage's first, then Apptainer's."""
    env = os.environ if environ is None else environ
    home = env.get("HOME") or os.path.expanduser("~")
    return [env.get("HPCIMAGE_KEYSDIR") or os.path.join(home, ".hpcimage", "keys"),
            env.get("APPTAINER_KEYSDIR") or os.path.join(home, ".apptainer", "keys")]


def public_keyring_files(include_global=True, environ=None):
    """The public keyrings that exist, personal first, then (include_global) the global ones."""
    files = [os.path.join(d, "pgp-public") for d in keys_dirs(environ)]
    if include_global:
        files += GLOBAL_PUBLIC
    return [f for f in files if os.path.isfile(f)]


def secret_keyring_files(environ=None):
    """The secret keyrings that exist, hpcimage's first, then Apptainer's."""
    files = [os.path.join(d, "pgp-secret") for d in keys_dirs(environ)]
    return [f for f in files if os.path.isfile(f)]
