"""The real MPI parts themselves, without hpcimage: Debian's Open MPI and MPICH, munge, the
one-node Slurm cluster of scripts/slurm.sh (srun, sbatch, the pmix plugin), mpi4py on the
host, and the cached Debian 12 image with Open MPI. What the image-mpi tests stand on."""
import json
import os
import socket
import subprocess

import pytest

from mpitools import (  # noqa: F401 (fixtures)
    HOST_LIBMPI, OMPI_SEPARATE_USERNS_ENV, host_mpi, mpi_hello, mpi_hello_mpich, mpirun,
    nompi_image, openmpi_dir, openmpi_sqfs, parse_hello, pingpong, sbatch, slurm_cluster, srun)

ALLREDUCE = ("from mpi4py import MPI; c = MPI.COMM_WORLD; "
             "print(c.rank, c.size, c.allreduce(c.rank + 1), "
             "MPI.Get_library_version().split(',')[0], flush=True)")
HOST_PY = "/usr/bin/python3"   # Debian's, with python3-mpi4py built against Debian's Open MPI


def _rows(out):
    return sorted(tuple(line.split(" ", 3)) for line in out.splitlines() if line.strip())


def _check_hello(r, n, impl="openmpi"):
    assert r.returncode == 0, r.stdout + r.stderr
    rows = parse_hello(r.stdout)
    assert [d["rank"] for d in rows] == list(range(n)), r.stdout + r.stderr
    assert {(d["size"], d["sum"]) for d in rows} == {(n, n * (n + 1) // 2)}
    assert {os.path.realpath(d["lib"]) for d in rows} == {os.path.realpath(HOST_LIBMPI[impl])}
    return rows


# ------------------------------------------------------------ packages

def test_open_mpi_is_the_default_and_mpich_is_reachable(host_mpi):
    assert os.path.realpath("/usr/bin/mpirun") == "/usr/bin/orterun"
    assert os.path.realpath("/usr/bin/mpicc") == "/usr/bin/opal_wrapper"
    for p in ("/usr/bin/mpicc.openmpi", "/usr/bin/mpirun.openmpi", "/usr/bin/mpicc.mpich",
              "/usr/bin/mpirun.mpich", "/usr/bin/mpiexec.mpich", HOST_LIBMPI["openmpi"],
              HOST_LIBMPI["mpich"], "/usr/lib/x86_64-linux-gnu/libpmix.so.2",
              "/usr/lib/x86_64-linux-gnu/slurm-wlm/mpi_pmix.so"):
        assert os.path.exists(p), p
    v = subprocess.run(["mpichversion"], capture_output=True, text=True).stdout
    assert "MPICH Version:" in v and "4." in v
    v = subprocess.run(["/usr/bin/mpirun", "--version"], capture_output=True, text=True).stdout
    assert "Open MPI" in v


def test_host_mpi4py_is_debians_built_on_open_mpi(host_mpi, user):
    r = user.run([HOST_PY, "-c", "import mpi4py, mpi4py.MPI as M; print(mpi4py.__file__); "
                  "print(M.Get_library_version())"])
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("/usr/lib/python3/dist-packages/mpi4py/")
    assert "Open MPI v4.1" in r.stdout


# ------------------------------------------------------------ Slurm

@pytest.mark.slurm
def test_munge_credential_as_user(slurm_cluster, user):
    r = user.run(["sh", "-c", "munge -n | unmunge"])
    assert r.returncode == 0, r.stderr
    assert "STATUS:          Success (0)" in r.stdout
    assert f"UID:             {user.name} ({user.uid})" in r.stdout


@pytest.mark.slurm
def test_cluster_is_up_with_pmix(slurm_cluster):
    assert slurm_cluster.node == socket.gethostname().split(".")[0]
    assert "pmix" in slurm_cluster.mpi_plugins and "pmi2" in slurm_cluster.mpi_plugins
    r = subprocess.run(["bash", "scripts/slurm.sh", "status"], capture_output=True, text=True,
                       cwd=os.path.dirname(os.path.dirname(__file__)))
    assert r.returncode == 0, r.stdout + r.stderr
    r = subprocess.run(["scontrol", "show", "config"], capture_output=True, text=True)
    assert "MpiDefault              = pmix" in r.stdout


@pytest.mark.slurm
def test_srun_hostname_as_user(slurm_cluster, user):
    r = srun(user, ["hostname"], n=2)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == [slurm_cluster.node] * 2


@pytest.mark.slurm
def test_srun_pmix_mpi4py_allreduce_on_the_host(slurm_cluster, user):
    r = srun(user, [HOST_PY, "-c", ALLREDUCE], n=4, mpi="pmix")
    assert r.returncode == 0, r.stdout + r.stderr
    assert _rows(r.stdout) == [(str(i), "4", "10", "Open MPI v4.1.4") for i in range(4)]


@pytest.mark.slurm
def test_srun_pmix_c_program_oversubscribed(slurm_cluster, user, mpi_hello):
    # 16 ranks on a 2-core machine: the node has HPCIMAGE_SLURM_CPUS (64) CPUs.
    assert slurm_cluster.cpus >= 16
    _check_hello(srun(user, [mpi_hello], n=16, mpi="pmix"), 16)
    r = srun(user, ["true"], n=slurm_cluster.cpus)
    assert r.returncode == 0, r.stderr


@pytest.mark.slurm
def test_sbatch_job_output(slurm_cluster, user, userdir, mpi_hello):
    b = sbatch(user, f"#!/bin/sh\n#SBATCH -n 4\n#SBATCH -J infra\n"
                     f"echo job=$SLURM_JOB_ID tasks=$SLURM_NTASKS\n"
                     f"srun hostname | sort -u\n"
                     f"srun --mpi=pmix {mpi_hello}\n"
                     f"exit 7\n", cwd=userdir)
    assert (b.state, b.rc) == ("FAILED", 7), (b.stderr, b.output)
    lines = b.output.splitlines()
    assert lines[0] == f"job={b.jobid} tasks=4", b.output
    assert lines[1] == slurm_cluster.node
    rows = parse_hello(b.output)
    assert [d["rank"] for d in rows] == [0, 1, 2, 3]
    assert {d["sum"] for d in rows} == {10}


@pytest.mark.slurm
def test_mpich_under_srun_pmi2(slurm_cluster, user, mpi_hello_mpich):
    # Debian's MPICH speaks PMI-1/PMI-2, not PMIx: --mpi=pmix would give N singletons.
    _check_hello(srun(user, [mpi_hello_mpich], n=3, mpi="pmi2"), 3, impl="mpich")


@pytest.mark.slurm
def test_open_mpi_in_sibling_user_namespaces_needs_no_cma(slurm_cluster, user, pingpong):
    # What a container runtime that gives each rank its own user namespace meets: CMA is
    # refused between them (vader hangs); with single copy off it runs.
    r = srun(user, ["unshare", "-r", pingpong, "200", "20"], n=2, mpi="pmix",
             env=OMPI_SEPARATE_USERNS_ENV, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    assert json.loads(r.stdout)["bw_MBps"] > 0


# ------------------------------------------------------------ mpirun (no Slurm)

def test_mpirun_oversubscribed_as_user(user, mpi_hello):
    _check_hello(mpirun(user, [mpi_hello], n=8), 8)
    r = mpirun(user, [HOST_PY, "-c", ALLREDUCE], n=4)
    assert r.returncode == 0, r.stdout + r.stderr
    assert _rows(r.stdout) == [(str(i), "4", "10", "Open MPI v4.1.4") for i in range(4)]


def test_mpirun_32_fast_exiting_processes_does_not_hang(host_mpi, user):
    # Open MPI 4.1's threaded launch (>= 32 local processes) loses processes that exit at
    # once and waits forever, about half the time; scripts/setup-mpi.sh sets
    # odls_base_max_threads = 0 in /etc/openmpi/openmpi-mca-params.conf.
    for _ in range(6):
        r = mpirun(user, ["true"], n=32, timeout=30)
        assert r.returncode == 0, r.stderr


def test_mpich_mpirun_as_user(user, mpi_hello_mpich):
    _check_hello(mpirun(user, [mpi_hello_mpich], n=4, impl="mpich"), 4, impl="mpich")


def test_pingpong_on_the_host(user, pingpong):
    r = mpirun(user, [pingpong, "2000", "50"], n=2)
    assert r.returncode == 0, r.stdout + r.stderr
    res = json.loads(r.stdout)
    assert res["lat_bytes"] == 8 and res["bw_bytes"] == 4 << 20
    assert 0 < res["lat_us"] < 1000 and res["bw_MBps"] > 100


# ------------------------------------------------------------ images

@pytest.mark.network
def test_openmpi_image_files(openmpi_dir, openmpi_sqfs):
    root = str(openmpi_dir)
    for p in ("usr/bin/mpirun.openmpi", "usr/bin/orted", "usr/bin/python3",
              "usr/lib/x86_64-linux-gnu/libmpi.so.40", "usr/lib/x86_64-linux-gnu/libpmix.so.2",
              "usr/lib/python3/dist-packages/mpi4py/MPI.cpython-311-x86_64-linux-gnu.so",
              ".singularity.d/env/90-environment.sh", ".singularity.d/runscript"):
        assert os.path.exists(os.path.join(root, p)), p
    assert os.readlink(os.path.join(root, "etc/alternatives/mpirun")) == "/usr/bin/mpirun.openmpi"
    with open(os.path.join(root, "etc/os-release")) as f:
        assert 'VERSION_ID="12"' in f.read()
    with open(openmpi_sqfs, "rb") as f:
        assert f.read(4) == b"hsqs"


@pytest.mark.network
def test_nompi_image_has_no_mpi(nompi_image):
    lib = os.path.join(nompi_image, "usr/lib/x86_64-linux-gnu")
    assert os.path.isdir(lib)
    assert not [n for n in os.listdir(lib) if n.startswith(("libmpi", "libmpich", "libpmix"))]
