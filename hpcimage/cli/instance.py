"""`hpcimage instance start|run|list|stop|stats|logs` (and the image-instance wrapper:
the same commands for the loaded module's image). The logic is in
hpcimage.runtime.instance; docs/instances.md."""
import sys

import click

_PASSTHROUGH = {"ignore_unknown_options": True, "allow_extra_args": True,
                "allow_interspersed_args": False, "help_option_names": []}


@click.group("instance", context_settings={"help_option_names": ["-h", "--help"]})
@click.pass_context
def instance(ctx):
    """Services in images: start, list, join (exec|run|shell instance://NAME), stop."""


def _starter(verb, what):
    @instance.command(verb, context_settings=_PASSTHROUGH, add_help_option=False,
                      help=f"Start {what} of IMAGE in the background as instance NAME: "
                      f"{verb} [OPTIONS] IMAGE NAME [ARGS]. Options: those of exec "
                      "(hpcimage exec --help).")
    @click.argument("args", nargs=-1, type=click.UNPROCESSED)
    @click.pass_context
    def command(ctx, args):
        from hpcimage.runtime.instance import start
        wrapper = ctx.find_root().info_name == "image-instance"
        return start.start(verb, list(args), wrapper=wrapper)
    return command


_starter("start", "the startscript (%startscript; %appstart with --app)")
_starter("run", "the runscript")


@instance.command("list")
@click.option("-j", "--json", "as_json", is_flag=True, help="as JSON")
@click.option("-l", "--logs", is_flag=True, help="the paths of the log files too")
@click.option("-u", "--user", metavar="USER", help="another user's (root only)")
@click.argument("pattern", required=False)
def list_command(as_json, logs, user, pattern):
    """The instances on this host (PATTERN: a glob of names); stale entries removed."""
    from hpcimage.runtime.instance import manage
    insts = manage.live(pattern, user)
    sys.stdout.write(manage.list_json(insts) if as_json else manage.list_text(insts, logs))


@instance.command("stop")
@click.option("-F", "--force", is_flag=True, help="SIGKILL at once")
@click.option("-s", "--signal", "sig", metavar="SIGNAL", help="the signal (default TERM)")
@click.option("-t", "--timeout", type=int, default=10, show_default=True,
              help="seconds before SIGKILL")
@click.option("-a", "--all", "all_", is_flag=True, help="every instance of yours")
@click.argument("names", nargs=-1)
def stop_command(force, sig, timeout, all_, names):
    """Stop instance NAME (or those matching PATTERN, or --all)."""
    from hpcimage.runtime.instance import manage
    for n in manage.stop(list(names), force, sig, timeout, all_, out=sys.stderr):
        click.echo(f"stopped instance {n}", err=True)


@instance.command("stats")
@click.option("-j", "--json", "as_json", is_flag=True, help="as JSON")
@click.argument("name")
def stats_command(as_json, name):
    """CPU and memory of the instance's processes."""
    from hpcimage.runtime.instance import manage
    sys.stdout.write(manage.stats(name, as_json))


@instance.command("logs")
@click.argument("name")
def logs_command(name):
    """Where the instance's stdout and stderr go."""
    from hpcimage.runtime.instance import manage
    sys.stdout.write(manage.logs(name))
