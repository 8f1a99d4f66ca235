"""The launch: a plan of typed operations (runtime.ops), then one loop that carries
them out (runtime.execute).

    UserNs, Private, Session, MountImage, MountData..., RootFs, IdentityFiles, Bind..., Remount,
    Pivot, Chdir, Exec

`plan(request)` runs the steps (runtime.steps.STEPS) on a request
(runtime.request.Request) and only reads; `Plan.describe()` prints the list
(`--dry-run`); `execute()` runs it. After `exec` no hpcimage process remains except,
for SquashFS and SIF images, the squashfuse daemon that the kernel kills when the
command exits (PR_SET_PDEATHSIG). Standard library only: this is the hot path.
"""
import os

from hpcimage.runtime.command import is_rank0, label
from hpcimage.runtime.steps import STEPS


class Plan:
    """ops, warnings and notes: the plan. The rest is the steps' working state:
    binds (the container's mounts, in order, until the root step makes them ops),
    contributions (host.Contribution, in order), dev_binds and private_dev (device
    nodes for /dev), env_add (variables added to the host environment the container's
    is computed from), keep_prefixes (variables that pass --cleanenv), rcfile (bash's
    for shell), workdir and cwd_note (for Chdir)."""

    def __init__(self):
        self.ops = []          # runtime.ops objects, in order
        self.warnings = []     # said once, before the launch
        self.notes = []        # what the steps found, skipped and why (--dry-run)
        self.binds = []
        self.contributions = []
        self.dev_binds = []
        self.private_dev = False
        self.env_add = {}
        self.keep_prefixes = ()
        self.rcfile = None
        self.workdir = None
        self.cwd_note = None
        self.image_root = None
        self.root_writable = False

    def add(self, op):
        self.ops.append(op)

    def contribute(self, c):
        """A host.Contribution: its warnings and notes now (a note once), its binds
        and environment by the steps that place them."""
        self.contributions.append(c)
        self.warnings.extend(c.warnings)
        self.notes.extend(n for n in dict.fromkeys(c.notes) if n not in self.notes)

    def warn(self, prog, environ):
        """Say the plan's warnings on stderr (MPI: rank 0 only)."""
        if is_rank0(environ):
            for w in self.warnings:
                os.write(2, f"{label(prog)}: warning: {w}\n".encode())

    def describe(self):
        """The plan as `--dry-run` prints it: the warnings and the steps' notes (host
        discovery's: what was found, what was skipped and why) as `# ` lines, then one
        op a line, its words quoted as sh would need them (`shlex.split(line,
        comments=True)` gives them back), then `  # ` and a note in words."""
        out = [f"# warning: {w}" for w in self.warnings]
        out += [f"# note: {n}" for n in self.notes]
        for op in self.ops:
            out += op.describe()
        return "\n".join(out) + "\n"


def plan(request, steps=STEPS):
    """The launch plan of request (runtime.request.Request): each step in order adds
    its ops, binds, contributions, warnings and notes."""
    p = Plan()
    for step in steps:
        step(request, p)
    return p


def split(p, op_type):
    """(ops before the first op of op_type, that op and the rest)."""
    k = next(i for i, op in enumerate(p.ops) if type(op) is op_type)
    head, tail = Plan(), Plan()
    head.ops, tail.ops = p.ops[:k], p.ops[k:]
    return head, tail
