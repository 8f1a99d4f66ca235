"""`hpcimage build`, without click: the command's logic, and a parser for its common
form that lets `hpcimage build [-s] [-F] [-T] [--build-arg N=V] OUT SOURCE` start
without importing click (~25 ms of a ~180 ms Demo build). Anything else (--help,
--all, --site, combined short flags, `--`, an unknown option) goes to click, which
stays the reference: tests/test_build_def.py checks that both parse alike."""
import sys

FLAGS = {"--sandbox": "sandbox", "-s": "sandbox", "--force": "force", "-F": "force",
         "--notest": "notest", "-T": "notest", "--verbose": "verbose", "-v": "verbose"}


def fast_parse(args):
    """The keyword arguments of run() for ARGS (after `build`), or None for click."""
    kw = {"sandbox": False, "force": False, "notest": False, "build_args": [],
          "all_": False, "site_path": "site.yaml", "verbose": False}
    pos, i = [], 0
    while i < len(args):
        a = args[i]
        if a in FLAGS:
            kw[FLAGS[a]] = True
        elif a == "--build-arg" and i + 1 < len(args):
            kw["build_args"].append(args[i + 1])
            i += 1
        elif a.startswith("--build-arg="):
            kw["build_args"].append(a[len("--build-arg="):])
        elif a.startswith("-"):
            return None
        else:
            pos.append(a)
        i += 1
    if len(pos) != 2:
        return None
    kw["build_args"] = tuple(kw["build_args"])
    kw["out"], kw["source"] = pos
    return kw


def _echo(text):
    sys.stderr.write(text + "\n")
    sys.stderr.flush()


def run(sandbox, force, notest, build_args, all_, site_path, out, source, verbose=False):
    """Build OUT from SOURCE (see `hpcimage build --help`); verbose: the bootstrap
    agent's own output (debootstrap's) on stderr too, not only the phases."""
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
                                 build_args=args, text=f"Bootstrap: {scheme}\n"
                                 f"From: {source[len(scheme) + 3:]}\n")
            _echo(f"hpcimage: built {out} ({kind}) from {source}")
            return
    src = convert.resolve_source(source)
    if src.kind == "def":
        from hpcimage.imagebuild import builder
        kind = builder.build(out, src.path, sandbox=sandbox, force=force, notest=notest,
                             build_args=args)
    else:
        if args or notest:
            raise UsageError("--build-arg and --notest apply to definition files only")
        kind = convert.build(out, src, sandbox=sandbox, force=force)
    _echo(f"hpcimage: built {out} ({kind}) from {source}")
