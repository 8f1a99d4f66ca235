"""setuptools hook: build hpcimage/runtime/mpi/hpcimage-join, image-mpi's per-rank joiner.

Metadata lives in setup.cfg. The joiner is a small C program (libc only) that keeps a
Python interpreter out of every MPI rank after the first on a node (bench/mpi). It is
compiled with $CC (default cc) when the package is built; without a C compiler the
build goes on without it and image-mpi starts every rank as a Python runtime (slower
launch, same behaviour); `hpcimage mpi doctor` says which.
"""
import os
import shutil
import subprocess
import sys

from setuptools import setup
from setuptools.command.build_py import build_py
from setuptools.dist import Distribution

SRC = os.path.join("hpcimage", "runtime", "mpi", "join.c")
EXE = "hpcimage-join"


class BuildPy(build_py):
    def run(self):
        super().run()
        out = os.path.join(self.build_lib, "hpcimage", "runtime", "mpi", EXE)
        cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
        if not cc:
            sys.stderr.write(f"hpcimage: no C compiler: {EXE} not built (image-mpi ranks "
                             "start as Python)\n")
            return
        cmd = [cc, "-O2", "-Wall", "-std=gnu99", "-o", out, SRC]
        r = subprocess.run(cmd)
        if r.returncode != 0:
            sys.stderr.write(f"hpcimage: {' '.join(cmd)} failed: {EXE} not built\n")
            return
        os.chmod(out, 0o755)


class BinaryDistribution(Distribution):
    """The wheel holds a compiled program: not a pure-Python wheel."""

    def has_ext_modules(self):
        return True


setup(cmdclass={"build_py": BuildPy}, distclass=BinaryDistribution)
