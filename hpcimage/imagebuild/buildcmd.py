"""`hpcimage build`: the command's logic. Its parser is click's (hpcimage.sifcli.build),
the only one; hpcimage.commands turns its errors into one line."""
import sys


def _echo(text):
    sys.stderr.write(text + "\n")
    sys.stderr.flush()


def run(sandbox, force, notest, build_args, all_, site_path, out, source, verbose=False,
        warn_unused=False, passphrase=False, encrypt=False, pem_path=None, say=None):
    """Build OUT from SOURCE (see `hpcimage build --help`); verbose: the bootstrap
    agent's own output (debootstrap's) on stderr too, not only the phases;
    passphrase/encrypt/pem_path: an encrypted SIF (imagebuild.crypt)."""
    import os
    from hpcimage.imagebuild import crypt
    if source and not say:
        from hpcimage.image import sif
        sif.refuse_encrypted_source(source)     # before any warning about the key
    key = None if say else crypt.build_key(passphrase, encrypt, pem_path, os.environ,
                                           lambda m: _echo(f"hpcimage: warning: {m}"))
    if key is not None:
        from hpcimage.errors import UsageError
        if all_ or sandbox or not out or not out.lower().endswith(".sif"):
            raise UsageError("an encrypted image is a SIF: build OUT.sif (not --sandbox, "
                             ".sqfs or --all)")
        from hpcimage.imagebuild import convert
        convert.check_out(os.path.abspath(out), force)
        crypt.encrypted_build(out, lambda plain: run(
            sandbox, False, notest, build_args, all_, site_path, plain, source, verbose,
            warn_unused, say=lambda *a: None), key,
            lambda m: _echo(f"hpcimage: note: {m}"))
        _echo(f"hpcimage: built {out} (sif, encrypted: {key.kind}) from {source}")
        return
    from hpcimage.imagebuild import convert
    from hpcimage.errors import UsageError
    if verbose:
        from hpcimage.imagebuild import builder
        builder.VERBOSE = True

    if all_:
        from hpcimage.imagebuild import builder
        if sandbox:
            raise UsageError("build --all publishes image files into the store: no --sandbox")
        only = [a for a in (out, source) if a]
        built, skipped, failed = builder.build_site(site_path, force=force, notest=notest,
                                                    only=only)
        _echo(f"hpcimage: build --all: built {len(built)}, skipped {len(skipped)}, "
              f"failed {len(failed)}" + (f" ({', '.join(failed)})" if failed else ""))
        raise SystemExit(1 if failed else 0)
    if not out or not source:
        raise UsageError("build: usage: hpcimage build [OPTIONS] OUT SOURCE "
                         "(or hpcimage build --all)")
    args = {}
    for a in build_args:
        k, eq, v = a.partition("=")
        if not eq or not k:
            raise UsageError(f"--build-arg {a!r}: want NAME=VALUE")
        args[k] = v
    for scheme in ("docker", "oras"):
        if source.startswith(scheme + "://"):
            from hpcimage.imagebuild import builder
            kind = builder.build(out, source, sandbox=sandbox, force=force, notest=notest,
                                 build_args=args, warn_unused_build_args=warn_unused,
                                 text=f"Bootstrap: {scheme}\n"
                                 f"From: {source[len(scheme) + 3:]}\n")
            (say or _built)(out, kind, source)
            return
    src = convert.resolve_source(source)
    if src.kind == "def":
        from hpcimage.imagebuild import builder
        kind = builder.build(out, src.path, sandbox=sandbox, force=force, notest=notest,
                             build_args=args, warn_unused_build_args=warn_unused)
    else:
        if args or notest:
            raise UsageError("--build-arg and --notest apply to definition files only")
        kind = convert.build(out, src, sandbox=sandbox, force=force)
    (say or _built)(out, kind, source)


def _built(out, kind, source):
    _echo(f"hpcimage: built {out} ({kind}) from {source}")
