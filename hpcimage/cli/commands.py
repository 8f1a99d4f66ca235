"""The `hpcimage` commands, with click; hpcimage.cli is the front door that calls main() here
and turns HpcimageError into one line."""
import sys

import click

from hpcimage.errors import HpcimageError


# Apptainer's commands that hpcimage does not have: refused by name (exit 2), never
# "no such command" as if they were a typo. A command registered here later wins.
APPTAINER_ONLY = ("cache", "capability", "checkpoint", "completion", "config", "delete",
                  "keyserver", "oci", "overlay", "plugin", "push",
                  "registry", "remote", "search")


class _Group(click.Group):
    def resolve_command(self, ctx, args):
        if args and args[0] in APPTAINER_ONLY and super().get_command(ctx, args[0]) is None:
            raise click.UsageError(f"{args[0]} is an Apptainer command that hpcimage does "
                                   "not support", ctx)
        return super().resolve_command(ctx, args)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="hpcimage", message="%(prog)s version %(version)s")
def cli():
    """Container images as environment modules, with an unprivileged runtime."""


@cli.command()
@click.option("--site", "site_path", default="site.yaml", show_default=True,
              type=click.Path(dir_okay=False), help="The site description.")
@click.option("--prefix", type=click.Path(file_okay=False), metavar="DIR",
              help="Render under DIR instead of the paths in site.yaml.")
@click.option("--check", is_flag=True,
              help="Write nothing; show a diff and exit 1 when the files are stale.")
@click.option("--format", "fmt", type=click.Choice(["lua", "tcl", "all"]), default="all",
              show_default=True, help="Lmod (lua), Environment Modules (tcl) or both.")
def generate(site_path, prefix, check, fmt):
    """Render modulefiles and image-* wrappers from site.yaml."""
    from hpcimage import generate as gen
    gen.run(site_path, prefix=prefix, check=check, fmt=fmt)


_PASSTHROUGH = {"ignore_unknown_options": True, "allow_extra_args": True,
                "allow_interspersed_args": False, "help_option_names": []}


def _runtime_command(verb, summary):
    @cli.command(verb, context_settings=_PASSTHROUGH, add_help_option=False,
                 help=summary + " Options as Apptainer's; `hpcimage " + verb +
                 " --help` lists them.")
    @click.argument("args", nargs=-1, type=click.UNPROCESSED)
    def command(args):
        from hpcimage.runtime.main import main as runtime_main
        runtime_main([verb, *args])
    return command


_runtime_command("exec", "Run a command inside IMAGE: exec [OPTIONS] IMAGE COMMAND [ARGS].")
_runtime_command("run", "Run IMAGE's runscript: run [OPTIONS] IMAGE [ARGS].")
_runtime_command("shell", "Start a shell inside IMAGE: shell [OPTIONS] IMAGE [SHELL ARGS].")
_runtime_command("test", "Run IMAGE's test script (%test): test [OPTIONS] IMAGE [ARGS].")

RUNTIME_HELP = ("exec", "run", "shell", "test")     # their help is the runtime's own

from hpcimage.cli.sifcli import build as _build, sif as _sif  # noqa: E402  (issue 3)
cli.add_command(_sif)
cli.add_command(_build)
from hpcimage.cli.pull import pull as _pull  # noqa: E402  (issue 14)
cli.add_command(_pull)
from hpcimage.cli.instance import instance as _instance  # noqa: E402  (issue 17)
cli.add_command(_instance)
from hpcimage.cli.keys import key as _key  # noqa: E402  (issue 18)
cli.add_command(_key)
cli.add_command(_key, "keys")
from hpcimage.cli.overlaycli import overlay as _overlay  # noqa: E402  (issue 16)
cli.add_command(_overlay)
from hpcimage.cli.signcli import sign as _sign, verify as _verify  # noqa: E402  (issue 18)
cli.add_command(_sign)
cli.add_command(_verify)


@cli.command()
@click.option("-l", "--labels", "labels", is_flag=True,
              help="the image's labels (the default)")
@click.option("-d", "--deffile", "deffile", is_flag=True,
              help="the definition file the image was built from")
@click.option("-r", "--runscript", "runscript", is_flag=True, help="the runscript")
@click.option("-s", "--startscript", "startscript", is_flag=True,
              help="the startscript (instances)")
@click.option("-t", "--test", "test", is_flag=True, help="the test script (%test)")
@click.option("-e", "--environment", "environment", is_flag=True,
              help="the environment scripts (%environment, a Docker image's ENV)")
@click.option("-H", "--helpfile", "helpfile", is_flag=True, help="the help text (%help)")
@click.option("--list-apps", "list_apps", is_flag=True, help="the SCI-F apps' names")
@click.option("--app", metavar="NAME", help="the SCI-F app NAME's sections instead")
@click.option("--all", "all_", is_flag=True,
              help="every section of the image and its apps (implies --json)")
@click.option("-j", "--json", "as_json", is_flag=True,
              help="JSON, as apptainer inspect --json: "
                   '{"data": {"attributes": {...}}, "type": "container"}')
@click.option("--summary", is_flag=True,
              help="hpcimage's summary: kind, size, labels, definition file, scripts, "
                   "environment, apps, SIF objects (text)")
@click.argument("image")
def inspect(image, labels, deffile, runscript, startscript, test, environment, helpfile,
            list_apps, app, all_, as_json, summary):
    """Show what IMAGE says about itself without starting it, as apptainer inspect:
    its labels (the default), or the sections the options select."""
    from hpcimage.image import metadata as insp
    if summary:
        if any((labels, deffile, runscript, startscript, test, environment, helpfile,
                list_apps, app, all_, as_json)):
            raise click.UsageError("--summary is hpcimage's own text summary and takes "
                                   "no other option (--all --json: every section as JSON)")
        click.echo(insp.run(image), nl=False)
        return
    chosen = dict(labels=labels, deffile=deffile, runscript=runscript,
                  startscript=startscript, test=test, environment=environment,
                  helpfile=helpfile)
    sections = tuple(s for s in insp.SECTIONS if chosen[s])
    data = insp.inspect(image, sections, app=app, list_apps=list_apps, all_=all_,
                        warn=lambda m: click.echo(f"hpcimage: warning: {m}", err=True))
    if as_json or all_:
        click.echo(insp.to_json(data), nl=False)
    else:
        click.echo(insp.to_text(data, app=app, list_apps=list_apps), nl=False)


@cli.command("run-help")
@click.option("--app", metavar="NAME", help="the help of the SCI-F app NAME")
@click.argument("image")
def run_help(image, app):
    """Show IMAGE's help text (%help; /.singularity.d/runscript.help), as apptainer
    run-help."""
    from hpcimage.image import metadata as insp
    data = insp.inspect(image, ("helpfile",), app=app)
    attrs = data["data"]["attributes"]
    text = attrs.get("helpfile") or attrs.get("apps", {}).get(app, {}).get("helpfile")
    click.echo(text if text else "No help sections were defined for this image")


@cli.command("help")
@click.argument("command", required=False)
@click.pass_context
def help_command(ctx, command):
    """Show the help of COMMAND (or of hpcimage), as apptainer help."""
    if command in RUNTIME_HELP:
        from hpcimage.runtime.main import main as runtime_main
        runtime_main([command, "--help"])
    top = ctx.parent
    cmd = top.command.get_command(top, command) if command else top.command
    if cmd is None:
        top.command.resolve_command(top, [command])     # Apptainer's, or no such command
    with click.Context(cmd, info_name=f"hpcimage {command}" if command else "hpcimage",
                       parent=None) as sub:
        click.echo(cmd.get_help(sub))


@cli.command("version")
def version():
    """Show hpcimage's version (as apptainer version: the number alone)."""
    from hpcimage import __version__
    click.echo(__version__)


@cli.command()
@click.argument("image")
def apps(image):
    """List the SCI-F apps of IMAGE (run one with `hpcimage run --app NAME IMAGE`)."""
    from hpcimage.image import metadata as insp
    for name in insp.metadata(image)["apps"]:
        click.echo(name)


@cli.command()
@click.argument("image", type=click.Path())
@click.option("--name", required=True, help="The image's name in site.yaml.")
@click.option("--version", "version", required=True, help="The image's version in site.yaml.")
@click.option("--site", "site_path", default="site.yaml", show_default=True,
              type=click.Path(dir_okay=False), help="The site description.")
@click.option("--definition", type=click.Path(dir_okay=False), metavar="FILE",
              help="The definition file IMAGE was built from (its sha256 goes into the "
                   "manifest; default: the one inside IMAGE).")
@click.option("--sign", is_flag=True, help="Sign a copy of IMAGE with the site's key "
              "(site.yaml signing.sign_key) and publish that (docs/signing.md).")
def publish(image, name, version, site_path, definition, sign):
    """Place IMAGE in the store as NAME/VERSION (the `file` site.yaml gives), atomically,
    and record it in the store's manifest (docs/store.md)."""
    from hpcimage.store.publish import publish
    publish(site_path, image, name, version, definition=definition, sign=sign)


@cli.command("update", context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--check", is_flag=True,
              help="Only report: exit 0 when the local copy is current, 1 when an update "
                   "is available, 2 on error.")
@click.option("--remove", is_flag=True, help="Remove the local copy.")
def update_command(check, remove):
    """Copy the loaded module's image (HPCIMAGE_IMAGE) from the store into your local
    image directory, verifying its sha256; the image-* commands then start the local
    copy while it is current. The image-update command of a loaded module runs this."""
    if check and remove:
        raise click.UsageError("--check and --remove exclude each other")
    from hpcimage.store.update import update
    return update(check=check, remove=remove)


@cli.command("doctor")
@click.option("--json", "as_json", is_flag=True,
              help="machine-readable output: a list of {name, status, detail, fix}")
@click.option("--site-config", metavar="PATH", type=click.Path(dir_okay=False),
              help="The site.json to check (default: $HPCIMAGE_SITE_CONFIG, else the one "
                   "beside image-exec on PATH).")
@click.option("--site", "site_yaml", metavar="SITE.YAML", type=click.Path(dir_okay=False),
              help="Compare the site.json with what this site.yaml renders.")
def doctor(as_json, site_config, site_yaml):
    """Check that this node can start containers: user namespaces, /dev/fuse,
    squashfuse, the session directory, the site configuration (needed), and overlayfs,
    fuse-overlayfs, fuse2fs, subordinate ids, Lmod, the MPI joiner. Each line is OK,
    WARN or FAIL with what to do. Exit 0 when containers can start, 1 when not."""
    from hpcimage.runtime import doctor as doc
    return doc.run(as_json, site_config, site_yaml)


@cli.group("mpi")
def mpi_group():
    """MPI on this node: what image-mpi finds."""


@mpi_group.command("doctor")
@click.option("--image", metavar="IMAGE",
              help="The image to check (default: $HPCIMAGE_IMAGE, the loaded module's).")
@click.option("--json", "as_json", is_flag=True, help="machine-readable output")
def mpi_doctor(image, as_json):
    """Say what image-mpi would use here (launcher, host MPI, the image's MPI, how
    the ranks of a node start) and why each mode (hybrid, bind) will or won't work.
    Exit 0 when at least one mode works, 1 when none does."""
    from hpcimage.runtime.mpi import doctor as mpidoctor
    return mpidoctor.run(image, as_json)


_NO_ARGS_IS_HELP = getattr(click.exceptions, "NoArgsIsHelpError", ())    # click >= 8.2


def usage_line(prog, e):
    """click's usage error as one line: `PROG: error: no such option: --x (see 'hpcimage
    build --help')`, instead of its three lines (Usage, Try, Error)."""
    msg = " ".join(e.format_message().split())
    msg = msg[:1].lower() + msg[1:]
    for what in ("option", "command"):      # click: No such option '--x'. Did you mean...
        head = f"no such {what} '"
        end = msg.find("'", len(head))
        if msg.startswith(head) and end > 0:
            rest = msg[end + 1:].strip(" .()")
            msg = f"no such {what}: {msg[len(head):end]}"
            if rest:
                msg += "; " + rest[:1].lower() + rest[1:].strip("()")
    msg = msg.rstrip(".")
    ctx = getattr(e, "ctx", None)
    path = ctx.command_path if ctx is not None else prog
    if prog == "image-update":
        path = "image-update"
    elif not path.startswith(prog):
        path = prog
    return f"{prog}: error: {' '.join(msg.split())} (see '{path} --help')"


def main(argv=None):
    args = sys.argv[1:] if argv is None else list(argv)
    prog, command = "hpcimage", cli
    if args[:1] == ["image-update"]:        # the image-update wrapper
        prog, command, args = "image-update", update_command, args[1:]
    elif args[:1] == ["image-instance"]:    # the image-instance wrapper
        prog, command, args = "image-instance", _instance, args[1:]
    try:
        rv = command.main(args=args, prog_name=prog, standalone_mode=False)
    except HpcimageError as e:
        click.echo(f"{prog}: error: {e.message}", err=True)
        sys.exit(e.status)
    except click.exceptions.Abort:
        click.echo(f"{prog}: aborted", err=True)
        sys.exit(130)
    except _NO_ARGS_IS_HELP as e:       # `hpcimage`, `hpcimage mpi`: the help, as click
        click.echo(e.format_message(), err=True)
        sys.exit(2)
    except click.UsageError as e:
        click.echo(usage_line(prog, e), err=True)
        sys.exit(2)
    except click.ClickException as e:
        click.echo(f"{prog}: error: {' '.join(e.format_message().split())}", err=True)
        sys.exit(e.exit_code)
    except click.exceptions.Exit as e:
        sys.exit(e.exit_code)
    # standalone_mode=False: click returns ctx.exit()'s code instead of raising it.
    sys.exit(rv if isinstance(rv, int) else 0)

if __name__ == "__main__":
    main()
