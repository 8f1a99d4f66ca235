"""image-mpi with real parts, as the non-root user: Slurm (slurmctld, slurmd, munge,
pmix) started by the set-up, Debian's Open MPI and MPICH, a Debian 12 image with
Open MPI and mpi4py (hybrid model), a Debian 12 image without MPI (bind model)."""
import os
import shutil
import subprocess
import time

import pytest

from conftest import PY, cli_argv, fuse_processes, wait_no_leaks
from mpitools import (host_mpi, slurm_cluster, mpi_hello, mpi_hello_mpich, openmpi_dir,  # noqa: F401
                      openmpi_sqfs, nompi_sqfs, srun, sbatch, parse_hello, user_copy)

pytestmark = pytest.mark.slurm

ALLREDUCE = ("from mpi4py import MPI; c = MPI.COMM_WORLD; "
             "print('rank', c.rank, 'size', c.size, 'sum', c.allreduce(c.rank + 1), flush=True)")


@pytest.fixture(scope="module")
def site(openmpi_sqfs, nompi_sqfs, tmp_path_factory, user):
    d = tmp_path_factory.mktemp("mpisite")
    for p in (d, *d.parents):
        if str(p).startswith("/tmp/pytest-of-root"):
            os.chmod(p, 0o755)
    (d / "site.yaml").write_text(f"""
store: /
python: {PY}
mpi:
  srun_mpi: pmix
images:
  - name: OpenMPI
    version: "12"
    file: {openmpi_sqfs}
  - name: NoMPI
    version: "12"
    file: {nompi_sqfs}
""")
    r = user.run(cli_argv("generate", "--site", str(d / "site.yaml"), "--prefix", str(d / "out")),
                 root=True)
    assert r.returncode == 0, r.stderr
    subprocess.run(["chmod", "-R", "a+rX", str(d)], check=True)
    return d / "out"


def env_for(site, image):
    w = site / "wrappers"
    return {"PATH": f"{w}:/usr/local/bin:/usr/bin:/bin", "HPCIMAGE_IMAGE": str(image),
            "HPCIMAGE_SITE_CONFIG": str(w / "site.json")}


def sums(out):
    return sorted(ln.split() for ln in out.splitlines() if ln.startswith("rank "))


def test_hybrid_mpi4py_under_srun_pmix(user, slurm_cluster, site, openmpi_sqfs, userdir):
    r = srun(user, ["image-mpi", "python3", "-c", ALLREDUCE], n=4, mpi="pmix",
             env=env_for(site, openmpi_sqfs), cwd=str(userdir))
    assert r.returncode == 0, r.stderr
    rows = sums(r.stdout)
    assert [int(x[1]) for x in rows] == [0, 1, 2, 3]
    assert all(x[3] == "4" and x[5] == "10" for x in rows), r.stdout


def test_hybrid_mpi4py_under_mpirun(user, host_mpi, site, openmpi_sqfs, userdir):
    r = user.run(["image-mpi", "-n", "4", "--oversubscribe", "python3", "-c", ALLREDUCE],
                 env=env_for(site, openmpi_sqfs), cwd=str(userdir), timeout=120)
    assert r.returncode == 0, r.stderr
    assert all(x[3] == "4" and x[5] == "10" for x in sums(r.stdout)) and len(sums(r.stdout)) == 4


def test_bind_model_uses_the_host_library(user, slurm_cluster, site, nompi_sqfs, mpi_hello, userdir):
    prog = user_copy(user, mpi_hello, userdir)
    r = srun(user, ["image-mpi", "--mpi-mode", "bind", f"./{prog.name}"], n=2, mpi="pmix",
             env=env_for(site, nompi_sqfs), cwd=str(userdir))
    assert r.returncode == 0, r.stderr
    rows = parse_hello(r.stdout)
    assert [x["rank"] for x in rows] == [0, 1] and all(x["sum"] == 3 for x in rows)
    # the image has no MPI: what /proc/self/maps shows is the host's, bound in
    assert all(x["lib"] == "/.singularity.d/libs/libmpi.so.40" for x in rows), rows
    assert "Open MPI" in rows[0]["version"]


def test_bind_model_refuses_abi_mismatch(user, slurm_cluster, site, nompi_sqfs, mpi_hello_mpich,
                                         userdir):
    prog = user_copy(user, mpi_hello_mpich, userdir)
    r = srun(user, ["image-mpi", "--mpi-mode", "bind", f"./{prog.name}"], n=1, mpi="pmix",
             env=env_for(site, nompi_sqfs), cwd=str(userdir))
    assert r.returncode != 0
    assert (f"image-mpi: error: ./{prog.name} is linked against libmpich.so.12 (mpich ABI) "
            "but the host MPI is libmpi.so.40 (openmpi ABI)") in r.stderr


def test_sbatch_job_runs_image_mpi(user, slurm_cluster, site, openmpi_sqfs, userdir):
    e = env_for(site, openmpi_sqfs)
    job = sbatch(user, f"""#!/bin/sh
#SBATCH -n 3
export PATH={e['PATH']} HPCIMAGE_IMAGE={e['HPCIMAGE_IMAGE']} HPCIMAGE_SITE_CONFIG={e['HPCIMAGE_SITE_CONFIG']}
image-mpi python3 -c "{ALLREDUCE}"
echo "job-done $?"
""", cwd=str(userdir), env=e)
    assert job.state == "COMPLETED", job.output
    assert "job-done 0" in job.output
    rows = sums(job.output)
    assert len(rows) == 3 and all(x[5] == "6" for x in rows), job.output


def test_eight_ranks_one_namespace_one_mount_nothing_left(user, slurm_cluster, site, openmpi_sqfs,
                                                         userdir):
    marks = userdir / "marks"
    marks.mkdir()
    os.chown(marks, user.uid, user.gid)
    p = user.popen(["srun", "-n", "8", "--mpi=pmix", "image-mpi", "sh", "-c",
                    'echo "ns $(readlink /proc/self/ns/user) $(readlink /proc/self/ns/mnt)"; '
                    f'touch {marks}/$PMIX_RANK; sleep 3'],
                   env=env_for(site, openmpi_sqfs), cwd=str(userdir),
                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while len(os.listdir(marks)) < 8 and time.monotonic() < deadline and p.poll() is None:
        time.sleep(0.05)
    daemons = fuse_processes(user.uid)
    out, err = p.communicate(timeout=120)
    assert p.returncode == 0, err
    ns = [ln for ln in out.splitlines() if ln.startswith("ns ")]
    assert len(ns) == 8 and len(set(ns)) == 1, ns
    assert len(daemons) == 1, daemons
    procs, mounts = wait_no_leaks(user.uid)
    assert procs == [] and mounts == []
