"""The runtime's options: one table. Read by the runtime's parser (options.py), by
image-mpi's split of its own options from the launcher's (mpi/launcher.py) and, through
the recipe (mpi/recipe.py), by hpcimage-join (mpi/join.c). Adding a row reaches all
three. Standard library only (hot path).

A row: (name, Options attribute, takes a value, what `image-mpi NAME` does with it):
  "ranks"     ours: passed to every rank
  "image-mpi" image-mpi's own (the mode of the ranks, --dry-run prints the launcher line)
  "launcher"  the launcher's: a short form or a name srun/mpirun also use (srun's -e is
              --error, -C --constraint, -B --extra-node-info; mpirun's --app an app file)
"""

FLAGS = (
    ("-B", "bind", True, "launcher"),
    ("--bind", "bind", True, "ranks"),
    ("-e", "cleanenv", False, "launcher"),
    ("--cleanenv", "cleanenv", False, "ranks"),
    ("-C", "contain", False, "launcher"),
    ("--contain", "contain", False, "ranks"),
    ("--no-home", "no_home", False, "ranks"),
    ("--pwd", "pwd", True, "ranks"),
    ("--env", "env", True, "ranks"),
    ("--app", "app", True, "launcher"),
    ("--nv", "nv", False, "ranks"),
    ("--rocm", "rocm", False, "ranks"),
    ("--ib", "ib", False, "ranks"),
    ("--dry-run", "dry_run", False, "image-mpi"),
    ("--mpi-mode", "mpi_mode", True, "image-mpi"),
)

HELP = ("-h", "--help")

# The parser's view: switches (no value) and valued options, name -> attribute. A valued
# short option also takes its value attached (-B/a,/b).
SWITCHES = {name: attr for name, attr, valued, _ in FLAGS if not valued}
VALUED = {name: attr for name, attr, valued, _ in FLAGS if valued}
ATTACHED = tuple(name for name in VALUED if len(name) == 2)

# image-mpi's view: its words (name -> takes a value); every other option word is the
# launcher's. --launcher is image-mpi's alone (not a runtime option).
IMAGE_MPI_ONLY = {"--launcher": True}
IMAGE_MPI = dict({name: valued for name, _, valued, where in FLAGS if where != "launcher"},
                 **IMAGE_MPI_ONLY)
LAUNCHERS = frozenset(name for name, _, _, where in FLAGS if where == "launcher")
