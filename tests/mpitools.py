"""Real MPI parts for the tests: the one-node Slurm cluster, host Open MPI and MPICH,
compiled MPI test programs, and the Debian 12 image with Open MPI and mpi4py.

    from mpitools import (slurm_cluster, openmpi_dir, openmpi_sqfs, openmpi_image,
                          nompi_image, nompi_sqfs, mpi_hello, mpi_hello_mpich, pingpong,
                          srun, sbatch, mpirun, compile_mpi, parse_hello, user_copy,
                          OMPI_SEPARATE_USERNS_ENV)

Fixtures (import them into the test module to use them):
    host_mpi        session; runs scripts/setup-mpi.sh when packages are missing (skips
                    with its message when that fails); mpi_hello & co. depend on it
    slurm_cluster   session; runs `scripts/slurm.sh start` (installs and starts munge,
                    slurmctld, slurmd on this host; idempotent, 0.5 s when up) and returns
                    a Cluster(node, cpus, mpi_plugins); skips with the script's message
                    when it cannot. The cluster is left running after the tests.
    openmpi_dir     session; CACHE/debian12-openmpi-v1: debootstrap bookworm minbase
                    + openmpi-bin, libopenmpi3, python3-mpi4py (about 300 MB, 1.5 min)
    openmpi_sqfs    session; the same as SquashFS
    openmpi_image   both of them, parametrised ("dir", "sqfs"), as str
    mpich_sqfs      session; CACHE/debian12-mpich-v1.sqfs: debootstrap bookworm minbase
                    + mpich, libmpich12 (the hybrid model with MPICH)
    nompi_image     session; conftest's debian_dir (Debian 12 without any MPI), as str
    nompi_sqfs      session; conftest's debian_sqfs, as str
    mpi_hello       session; tests/mpi/mpi_hello.c built with mpicc.openmpi (cached binary)
    mpi_hello_mpich session; the same with mpicc.mpich
    pingpong        session; tests/mpi/pingpong.c built with mpicc.openmpi

Helpers (all run as the test user `user`, a conftest.User, from `cwd`, default its HOME;
each returns a subprocess.CompletedProcess with text stdout/stderr; on a timeout they
cancel the user's Slurm jobs and fail the test):
    srun(user, argv, n=1, mpi=None, env=None, cwd=None, timeout=120, opts=())
    sbatch(user, script, cwd, env=None, timeout=120, opts=())
        -> Batch(jobid, state, rc, output, stderr); waits polling scontrol every 0.1 s
    wait_job(jobid, timeout=120) -> (state, rc);  job_state(jobid) -> (state, rc)
    mpirun(user, argv, n=1, env=None, cwd=None, timeout=120, opts=(), impl="openmpi")
        Open MPI: /usr/bin/mpirun.openmpi --oversubscribe -n N;  MPICH: /usr/bin/mpirun.mpich -n N
    compile_mpi(name, impl="openmpi") -> Path    tests/mpi/<name>.c, cached, world-readable
    parse_hello(stdout) -> [dict(rank=, size=, sum=, host=, lib=, version=)] sorted by rank
    user_copy(user, path, dest_dir) -> Path      copy a binary where the container sees it

Facts of this set-up (docs/mpi-setup.md has the why):
    * srun --mpi=pmix works (slurm-wlm-basic-plugins' mpi_pmix_v4.so, MpiDefault=pmix);
      --mpi=pmi2 also; MPICH (Debian's, ch4:ucx) wires up under pmi2 or mpirun.mpich only.
    * Open MPI 4.1 ranks in DIFFERENT user namespaces hang in vader's CMA single copy
      unless OMPI_SEPARATE_USERNS_ENV is set; ranks sharing one namespace need nothing.
"""
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from conftest import CACHE, REPO, _cached, _mksquashfs

SLURM_SH = REPO / "scripts" / "slurm.sh"
MPI_SRC = REPO / "tests" / "mpi"
MPICC = {"openmpi": "/usr/bin/mpicc.openmpi", "mpich": "/usr/bin/mpicc.mpich"}
MPIRUN = {"openmpi": "/usr/bin/mpirun.openmpi", "mpich": "/usr/bin/mpirun.mpich"}
HOST_LIBMPI = {"openmpi": "/usr/lib/x86_64-linux-gnu/libmpi.so.40",
               "mpich": "/usr/lib/x86_64-linux-gnu/libmpich.so.12"}
OPENMPI_PACKAGES = ("openmpi-bin", "libopenmpi3", "python3-mpi4py")
# Open MPI 4.1 between ranks in sibling user namespaces: CMA (process_vm_readv) is refused,
# vader warns "will fall back" and then hangs on the first large message. Not needed when
# the ranks of a node share one user namespace.
OMPI_SEPARATE_USERNS_ENV = {"OMPI_MCA_btl_vader_single_copy_mechanism": "none"}


# ---------------------------------------------------------------- packages

@pytest.fixture(scope="session")
def host_mpi():
    """Debian's Open MPI, MPICH, mpi4py, PMIx, Slurm and munge, installed by
    scripts/setup-mpi.sh when missing (skips with its message when that fails)."""
    sh = str(REPO / "scripts" / "setup-mpi.sh")
    if subprocess.run(["bash", sh, "--check"], capture_output=True).returncode == 0:
        return True
    if os.geteuid() != 0:
        pytest.skip("MPI packages missing and not root: run scripts/setup-mpi.sh")
    r = subprocess.run(["bash", sh], capture_output=True, text=True, stdin=subprocess.DEVNULL,
                       timeout=900)
    if r.returncode != 0:
        pytest.skip("scripts/setup-mpi.sh failed: "
                    + " | ".join((r.stdout + r.stderr).strip().splitlines()[-5:]))
    return True


# ---------------------------------------------------------------------- Slurm

@dataclass
class Cluster:
    node: str
    cpus: int
    mpi_plugins: list = field(default_factory=list)
    conf: str = "/etc/slurm/slurm.conf"


def slurm_start(timeout=900):
    """(ok, message) of `scripts/slurm.sh start`."""
    if os.geteuid() != 0:
        return False, "scripts/slurm.sh start needs root"
    try:
        r = subprocess.run(["bash", str(SLURM_SH), "start"], capture_output=True, text=True,
                           timeout=timeout, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        return False, f"scripts/slurm.sh start: no answer in {timeout}s"
    msg = (r.stdout + r.stderr).strip()
    return r.returncode == 0, msg


@pytest.fixture(scope="session")
def slurm_cluster():
    ok, msg = slurm_start()
    if not ok:
        pytest.skip("no Slurm test cluster: " + " | ".join(msg.splitlines()[-8:]))
    conf = Path("/etc/slurm/slurm.conf").read_text()
    node = re.search(r"^NodeName=(\S+)", conf, re.M).group(1)
    cpus = int(re.search(r"^NodeName=.*\bCPUs=(\d+)", conf, re.M).group(1))
    r = subprocess.run(["srun", "--mpi=list"], capture_output=True, text=True)
    plugins = re.findall(r"^\s*(?:srun: )?(\w+)\s*$", r.stdout + r.stderr, re.M)
    return Cluster(node, cpus, [p for p in plugins if p != "specific"])


def _cancel_jobs(user):
    subprocess.run(["scancel", "-u", user.name], capture_output=True)


def _run(user, argv, env, cwd, timeout):
    try:
        return user.run([str(a) for a in argv], env=env, cwd=cwd, timeout=timeout)
    except AssertionError:
        _cancel_jobs(user)
        raise


def srun(user, argv, n=1, mpi=None, env=None, cwd=None, timeout=120, opts=()):
    """`srun [--mpi=MPI] -n N [opts] argv` as user; waits for the step."""
    cmd = ["srun", "-n", str(n)]
    if mpi:
        cmd.append(f"--mpi={mpi}")
    return _run(user, cmd + list(opts) + list(argv), env, cwd, timeout)


@dataclass
class Batch:
    jobid: str
    state: str         # COMPLETED, FAILED, CANCELLED, TIMEOUT, ...
    rc: int            # the batch script's exit status (ExitCode=rc:signal)
    output: str        # the job's stdout+stderr file
    stderr: str        # sbatch's own


TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "PREEMPTED",
            "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}


def job_state(jobid):
    """(state, exit status) of a job from `scontrol show job` (kept MinJobAge=60 s)."""
    r = subprocess.run(["scontrol", "show", "job", "-o", str(jobid)], capture_output=True,
                       text=True)
    st = re.search(r"\bJobState=(\S+)", r.stdout)
    ec = re.search(r"\bExitCode=(\d+):(\d+)", r.stdout)
    return (st[1] if st else "UNKNOWN"), (int(ec[1]) if ec else -1)


def wait_job(jobid, timeout=120, user=None):
    """Poll every 0.1 s until the job ends (sbatch --wait polls every 2-10 s)."""
    deadline = time.monotonic() + timeout
    while True:
        state, rc = job_state(jobid)
        if state in TERMINAL:
            return state, rc
        if time.monotonic() > deadline:
            subprocess.run(["scancel", str(jobid)], capture_output=True)
            raise AssertionError(f"job {jobid} still {state} after {timeout}s")
        time.sleep(0.1)


def sbatch(user, script, cwd, env=None, timeout=120, opts=()):
    """Submit `script` (text, a #!/bin/sh batch script) as user from cwd, wait for the
    job to end and return its state, exit status and output file."""
    cwd = Path(cwd)
    tag = next(tempfile._get_candidate_names())
    spath, opath = cwd / f"job-{tag}.sh", cwd / f"job-{tag}.out"
    spath.write_text(script)
    os.chown(spath, user.uid, user.gid)
    spath.chmod(0o755)
    r = _run(user, ["sbatch", "--parsable", "-o", opath, *opts, spath], env, cwd, 60)
    if r.returncode != 0:
        raise AssertionError(f"sbatch failed: {r.stderr.strip()}")
    jobid = r.stdout.strip().split(";")[0]
    state, rc = wait_job(jobid, timeout)
    out = opath.read_text() if opath.exists() else ""
    return Batch(jobid, state, rc, out, r.stderr)


def mpirun(user, argv, n=1, env=None, cwd=None, timeout=120, opts=(), impl="openmpi"):
    """The host's mpirun (Open MPI with --oversubscribe, or MPICH's hydra) as user."""
    cmd = [MPIRUN[impl]]
    if impl == "openmpi":
        cmd.append("--oversubscribe")
    cmd += ["-n", str(n), *opts, *argv]
    return _run(user, cmd, env, cwd, timeout)


# ------------------------------------------------------------- MPI programs

def compile_mpi(name, impl="openmpi"):
    """tests/mpi/NAME.c built with Debian's mpicc for impl; cached in CACHE/mpi-bin."""
    src = MPI_SRC / f"{name}.c"
    cc = MPICC[impl]
    if not os.access(cc, os.X_OK):
        pytest.skip(f"{cc} missing: run scripts/setup-mpi.sh")
    h = hashlib.sha256(src.read_bytes() + cc.encode()).hexdigest()[:12]
    (CACHE / "mpi-bin").mkdir(parents=True, exist_ok=True)
    os.chmod(CACHE / "mpi-bin", 0o755)

    def build(path):
        r = subprocess.run([cc, "-O2", "-o", str(path), str(src)], capture_output=True,
                           text=True)
        if r.returncode != 0:
            raise RuntimeError(f"{cc} {src}: {r.stderr.strip()}")
    return _cached(f"mpi-bin/{name}-{impl}-{h}", build)


@pytest.fixture(scope="session")
def mpi_hello(host_mpi):
    return compile_mpi("mpi_hello", "openmpi")


@pytest.fixture(scope="session")
def mpi_hello_mpich(host_mpi):
    return compile_mpi("mpi_hello", "mpich")


@pytest.fixture(scope="session")
def pingpong(host_mpi):
    return compile_mpi("pingpong", "openmpi")


_HELLO = re.compile(r"^rank=(\d+) size=(\d+) sum=(\d+) host=(\S*) lib=(\S*) version=(.*)$")


def parse_hello(stdout):
    rows = []
    for line in stdout.splitlines():
        m = _HELLO.match(line.strip())
        if m:
            rows.append(dict(rank=int(m[1]), size=int(m[2]), sum=int(m[3]), host=m[4],
                             lib=m[5], version=m[6]))
    return sorted(rows, key=lambda d: d["rank"])


def user_copy(user, path, dest_dir):
    """Copy path into dest_dir (e.g. userdir, which containers see), owned by user."""
    dst = Path(dest_dir) / Path(path).name
    shutil.copy2(path, dst)
    os.chown(dst, user.uid, user.gid)
    dst.chmod(0o755)
    return dst


# ------------------------------------------------------------------ images

def _openmpi_tree(path):
    r = subprocess.run([sys.executable, "-m", "hpcimage.imagebuild.debootstrap",
                        "--include=" + ",".join(OPENMPI_PACKAGES), str(path)],
                       cwd=REPO, capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip("cannot build the Debian 12 Open MPI image (no mirror?): "
                    + r.stderr.strip())


@pytest.fixture(scope="session")
def openmpi_dir():
    """Debian 12 + Open MPI 4.1.4 (its own libmpi.so.40, libpmix.so.2) + mpi4py."""
    return _cached("debian12-openmpi-v1", _openmpi_tree)


@pytest.fixture(scope="session")
def openmpi_sqfs(openmpi_dir):
    return _cached("debian12-openmpi-v1.sqfs", lambda p: _mksquashfs(openmpi_dir, p))


MPICH_PACKAGES = ("mpich", "libmpich12")


def _mpich_tree(path):
    r = subprocess.run([sys.executable, "-m", "hpcimage.imagebuild.debootstrap",
                        "--include=" + ",".join(MPICH_PACKAGES), str(path)],
                       cwd=REPO, capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip("cannot build the Debian 12 MPICH image (no mirror?): " + r.stderr.strip())


@pytest.fixture(scope="session")
def mpich_sqfs():
    """Debian 12 + MPICH 4.0 (its own libmpich.so.12, ch4:ucx), SquashFS: the hybrid
    model with MPICH (about 230 MB, 40 s to build)."""
    tree = _cached("debian12-mpich-v1", _mpich_tree)
    return _cached("debian12-mpich-v1.sqfs", lambda p: _mksquashfs(tree, p))


@pytest.fixture(params=["dir", "sqfs"])
def openmpi_image(request, openmpi_dir):
    if request.param == "dir":
        return str(openmpi_dir)
    return str(request.getfixturevalue("openmpi_sqfs"))


@pytest.fixture(scope="session")
def nompi_image(debian_dir):
    """Debian 12 without MPI (the bind model brings the host's)."""
    return str(debian_dir)


@pytest.fixture(scope="session")
def nompi_sqfs(debian_sqfs):
    return str(debian_sqfs)
