"""image-mpi across nodes: a Slurm cluster of separate nodes on this one machine
(scripts/slurm-nodes.sh: each node its own network, hostname and /tmp, one slurmd per
node), started here and stopped at the end. As the non-root test user, from the login
side (the controller's network namespace): srun, salloc, sbatch, and mpirun outside
Slurm (through scripts/nodes-rsh.py); one container per node and job step; nothing
left on any node afterwards.

What the nodes share, as a cluster's nodes do: /var/tmp (the job's directory below),
/var/cache (the images), /opt and /home; /tmp is each node's own."""
import os
import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from conftest import PY, REPO, cli_argv
from mpitools import (host_mpi, slurm_cluster, openmpi_dir, openmpi_sqfs, nompi_sqfs,  # noqa: F401
                      mpich_sqfs, mpi_hello, mpi_hello_mpich, parse_hello)

pytestmark = pytest.mark.slurm

NODES_SH = REPO / "scripts" / "slurm-nodes.sh"
STATE = Path("/var/tmp/hpcimage-nodes")


class Nodes:
    """The running cluster: commands on its login side and on its nodes."""

    def __init__(self, names):
        self.names = names

    def command(self, user, argv, env=None, cwd=None):
        e = dict(user.env(env), SLURM_CONF=str(STATE / "slurm.conf"))
        envargs = [f"{k}={v}" for k, v in e.items()]
        return ["bash", str(NODES_SH), "login", "-u", user.name, "env", "-i", *envargs,
                "sh", "-c", 'cd "$0" && exec "$@"', str(cwd or user.home), *map(str, argv)]

    def popen(self, user, argv, env=None, cwd=None):
        return subprocess.Popen(self.command(user, argv, env, cwd), stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL)

    def processes(self, user, node, comm):
        """pids of user's processes named comm in node's network namespace."""
        out = []
        for pid in subprocess.run(["ip", "netns", "pids", f"hpcimage-{node}"],
                                  capture_output=True, text=True).stdout.split():
            try:
                if (os.stat(f"/proc/{pid}").st_uid == user.uid
                        and Path(f"/proc/{pid}/comm").read_text().strip().startswith(comm)):
                    out.append(int(pid))
            except OSError:
                pass
        return out

    def login(self, user, argv, env=None, cwd=None, timeout=180):
        """argv as user on the login side (srun, salloc, sbatch, mpirun reach the nodes
        from there), with env (besides the user's basics) and cwd."""
        cmd = self.command(user, argv, env, cwd)
        try:
            return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                                  stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired as e:
            self.cancel(user)
            raise AssertionError(f"timed out: {argv}\n{e.stdout}\n{e.stderr}")

    def on(self, node, argv, timeout=60):
        """argv as root on node (its network, hostname and /tmp)."""
        return subprocess.run(["bash", str(NODES_SH), "node", node, *map(str, argv)],
                              capture_output=True, text=True, timeout=timeout)

    def cancel(self, user):
        subprocess.run(["bash", str(NODES_SH), "login", "scancel", "-u", user.name],
                       capture_output=True)

    def leftovers(self, user, timeout=10):
        """{node: [what of the user's is left there]}: processes in the node's network
        namespace (a container, a holder, squashfuse), and the user's MPI state
        directory in the node's /tmp. Waits up to timeout for the job's end to settle."""
        deadline = time.monotonic() + timeout
        while True:
            left = {}
            for n in self.names:
                found = []
                pids = subprocess.run(["ip", "netns", "pids", f"hpcimage-{n}"],
                                      capture_output=True, text=True).stdout.split()
                for pid in pids:
                    try:
                        if os.stat(f"/proc/{pid}").st_uid == user.uid:
                            found.append("process " + Path(f"/proc/{pid}/comm").read_text().strip())
                    except OSError:
                        pass
                r = self.on(n, ["ls", "-A", "/tmp"])
                found += [f"/tmp/{x}" for x in r.stdout.split() if x.startswith("hpcimage-")]
                if found:
                    left[n] = found
            if not left or time.monotonic() > deadline:
                return left
            time.sleep(0.2)


def start(n):
    if os.geteuid() != 0:
        pytest.skip("scripts/slurm-nodes.sh needs root")
    if not (shutil.which("ip") and shutil.which("nsenter") and shutil.which("slurmd")):
        pytest.skip("ip, nsenter or slurmd missing (scripts/setup-mpi.sh)")
    r = subprocess.run(["bash", str(NODES_SH), "start", str(n)], capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    return Nodes([f"n{i}" for i in range(1, n + 1)])


@pytest.fixture(scope="module")
def nodes(host_mpi, slurm_cluster):
    c = start(2)
    yield c
    subprocess.run(["bash", str(NODES_SH), "stop"], capture_output=True, timeout=120)


@pytest.fixture(scope="module")
def jobdir(user):
    """A directory of the user's on the shared file system (not /tmp: node-local)."""
    d = Path(tempfile.mkdtemp(prefix="hpcimage-multinode-", dir="/var/tmp"))
    os.chmod(d, 0o755)
    shutil.copy(REPO / "tests" / "mpi" / "nodes_check.py", d / "nodes_check.py")
    for p in (d, d / "nodes_check.py"):
        os.chown(p, user.uid, user.gid)
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="module")
def site(jobdir, openmpi_sqfs, nompi_sqfs, user):
    (jobdir / "site.yaml").write_text(f"""
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
    r = subprocess.run(cli_argv("generate", "--site", str(jobdir / "site.yaml"), "--prefix",
                                str(jobdir / "out")), capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    subprocess.run(["chmod", "-R", "a+rX", str(jobdir / "out")], check=True)
    return jobdir / "out"


def env_for(site, image, **extra):
    w = site / "wrappers"
    return {"PATH": f"{w}:/usr/local/bin:/usr/bin:/bin", "HPCIMAGE_IMAGE": str(image),
            "HPCIMAGE_SITE_CONFIG": str(w / "site.json"), **extra}


ROW = re.compile(r"rank (\d+) size (\d+) sum (\d+) ring (\S+) big (\S+) host (\S+) "
                 r"userns (\S+) mntns (\S+)$")


def check_rows(out, n, hosts):
    """Every rank's line of nodes_check.py: the right sums, the ring and the 4 MiB
    exchange work, the ranks are on `hosts`, and the ranks of a node share one user
    and one mount namespace (one container per node), different on each node."""
    rows = [ROW.match(ln) for ln in out.splitlines()]
    rows = sorted((m.groups() for m in rows if m), key=lambda g: int(g[0]))
    assert [int(g[0]) for g in rows] == list(range(n)), out
    assert all(int(g[1]) == n and int(g[2]) == n * (n + 1) // 2 for g in rows), out
    assert all(g[3] == "OK" and g[4] == "OK" for g in rows), out
    by_host = {}
    for g in rows:
        by_host.setdefault(g[5], set()).add((g[6], g[7]))
    assert sorted(by_host) == sorted(hosts), out
    assert all(len(v) == 1 for v in by_host.values()), by_host
    assert len({next(iter(v)) for v in by_host.values()}) == len(hosts), by_host


def test_the_nodes_are_separate_machines(nodes, user, jobdir):
    r = nodes.login(user, ["srun", "-N2", "-n2", "sh", "-c",
                           'echo "$(hostname) $(readlink /proc/self/ns/net) '
                           '$(stat -c %d:%i /tmp)"'], cwd=jobdir)
    assert r.returncode == 0, r.stderr
    rows = sorted(ln.split() for ln in r.stdout.splitlines())
    assert [row[0] for row in rows] == ["n1", "n2"]
    assert rows[0][1] != rows[1][1] and rows[0][2] != rows[1][2], rows


def test_srun_pmix_hybrid_across_two_nodes(nodes, user, site, jobdir, openmpi_sqfs):
    r = nodes.login(user, ["srun", "-N2", "-n4", "--mpi=pmix", "image-mpi", "python3",
                           "nodes_check.py"], env=env_for(site, openmpi_sqfs), cwd=jobdir)
    assert r.returncode == 0, r.stderr
    check_rows(r.stdout, 4, ["n1", "n2"])
    assert nodes.leftovers(user) == {}


def test_one_image_mount_per_node_while_the_job_runs(nodes, user, site, jobdir,
                                                     openmpi_sqfs):
    """Four ranks on each node: one squashfuse (one opening of the image file) per node,
    not one per rank; on each node one rank is a Python runtime (it opens the image and
    sets the container up), the other three join through hpcimage-join, which never
    opens the image file."""
    marks = jobdir / "marks"
    marks.mkdir()
    os.chown(marks, user.uid, user.gid)
    p = nodes.popen(user, ["srun", "-l", "-N2", "-n8", "--ntasks-per-node=4", "--mpi=pmix",
                           "image-mpi", "sh", "-c", f'touch {marks}/$PMIX_RANK; sleep 3'],
                    env=env_for(site, openmpi_sqfs, HPCIMAGE_TRACE="1"), cwd=jobdir)
    deadline = time.monotonic() + 60
    while len(os.listdir(marks)) < 8 and time.monotonic() < deadline and p.poll() is None:
        time.sleep(0.05)
    daemons = {n: nodes.processes(user, n, "squashfuse") for n in nodes.names}
    out, err = p.communicate(timeout=120)
    assert p.returncode == 0, err
    assert sorted(os.listdir(marks), key=int) == [str(i) for i in range(8)]
    assert {n: len(v) for n, v in daemons.items()} == {"n1": 1, "n2": 1}, daemons
    # srun -l: "TASK: ..."; tasks 0-3 on n1, 4-7 on n2 (--ntasks-per-node=4, block)
    python = {int(ln.split(":")[0]) // 4 for ln in err.splitlines()
              if "hpcimage-join:" in ln and "Python rank" in ln}
    joined = [int(ln.split(":")[0]) // 4 for ln in err.splitlines()
              if "hpcimage-join:" in ln and "joined holder" in ln]
    assert python == {0, 1} and sorted(joined) == [0, 0, 0, 1, 1, 1], err
    assert nodes.leftovers(user) == {}


def test_image_mpi_inside_salloc(nodes, user, site, jobdir, openmpi_sqfs):
    r = nodes.login(user, ["salloc", "-N2", "-n4", "image-mpi", "python3", "nodes_check.py"],
                    env=env_for(site, openmpi_sqfs), cwd=jobdir)
    assert r.returncode == 0, r.stderr
    check_rows(r.stdout, 4, ["n1", "n2"])
    assert nodes.leftovers(user) == {}


def test_sbatch_two_nodes(nodes, user, site, jobdir, openmpi_sqfs):
    script = jobdir / "job.sh"
    script.write_text("#!/bin/sh\nimage-mpi python3 nodes_check.py\n")
    os.chown(script, user.uid, user.gid)
    script.chmod(0o755)
    out = jobdir / "job.out"
    r = nodes.login(user, ["sbatch", "--wait", "-N2", "-n4", "-o", out, script],
                    env=env_for(site, openmpi_sqfs), cwd=jobdir)
    assert r.returncode == 0, r.stdout + r.stderr + (out.read_text() if out.exists() else "")
    check_rows(out.read_text(), 4, ["n1", "n2"])
    assert nodes.leftovers(user) == {}


def test_mpirun_outside_slurm_through_rsh(nodes, user, site, jobdir, openmpi_sqfs):
    env = env_for(site, openmpi_sqfs,
                  OMPI_MCA_plm_rsh_agent=str(STATE / "nodes-rsh.py"))
    r = nodes.login(user, ["image-mpi", "--launcher", "mpirun", "--host", "n1:2,n2:2",
                           "-n", "4", "python3", "nodes_check.py"], env=env, cwd=jobdir)
    assert r.returncode == 0, r.stderr
    check_rows(r.stdout, 4, ["n1", "n2"])
    assert nodes.leftovers(user) == {}


def test_bind_model_across_two_nodes(nodes, user, site, jobdir, nompi_sqfs, mpi_hello):
    prog = jobdir / "mpi_hello"
    shutil.copy2(mpi_hello, prog)
    os.chown(prog, user.uid, user.gid)
    r = nodes.login(user, ["srun", "-N2", "-n4", "--mpi=pmix", "image-mpi", "--mpi-mode",
                           "bind", str(prog)], env=env_for(site, nompi_sqfs), cwd=jobdir)
    assert r.returncode == 0, r.stderr
    rows = parse_hello(r.stdout)
    assert [d["rank"] for d in rows] == [0, 1, 2, 3] and all(d["sum"] == 10 for d in rows)
    assert sorted({d["host"] for d in rows}) == ["n1", "n2"], r.stdout
    assert all(d["lib"] == "/.singularity.d/libs/libmpi.so.40" for d in rows), r.stdout
    assert nodes.leftovers(user) == {}


def test_mpich_hybrid_across_two_nodes(nodes, user, site, jobdir, mpich_sqfs, mpi_hello_mpich):
    """The image's MPICH (ch4:ucx) under srun --mpi=pmi2 on two nodes.
    UCX_POSIX_USE_PROC_LINK=n: UCX takes ranks with one boot id for one host, so the
    simulated nodes (one kernel) look like one to it and it attaches the other node's
    shared memory through /proc/PID/fd, which is refused between the two nodes'
    containers (user namespaces); real nodes differ in boot id (docs/mpi-setup.md)."""
    prog = jobdir / "mpi_hello_mpich"
    shutil.copy2(mpi_hello_mpich, prog)
    os.chown(prog, user.uid, user.gid)
    r = nodes.login(user, ["srun", "-N2", "-n4", "--mpi=pmi2", "image-mpi", str(prog)],
                    env=env_for(site, mpich_sqfs, UCX_POSIX_USE_PROC_LINK="n"), cwd=jobdir)
    assert r.returncode == 0, r.stderr
    rows = parse_hello(r.stdout)
    assert [d["rank"] for d in rows] == [0, 1, 2, 3] and all(d["sum"] == 10 for d in rows)
    assert sorted({d["host"] for d in rows}) == ["n1", "n2"], r.stdout
    assert all(d["lib"].startswith("/usr/lib/x86_64-linux-gnu/libmpich.so.12")
               and d["version"].startswith("MPICH") for d in rows), r.stdout
    assert nodes.leftovers(user) == {}


def test_a_rank_killed_on_one_node_ends_the_job_everywhere(nodes, user, site, jobdir,
                                                           openmpi_sqfs):
    prog = ("from mpi4py import MPI; import os, signal, time; c = MPI.COMM_WORLD; "
            "c.Barrier(); print('up', c.rank, flush=True); "
            "time.sleep(1); c.rank == 3 and os.kill(os.getpid(), signal.SIGKILL); "
            "c.Barrier(); time.sleep(120)")
    # -K (--kill-on-bad-exit): without it (and without KillOnBadExit=1 in slurm.conf)
    # Slurm leaves the other tasks running, bare `srun python3` as much as image-mpi.
    t0 = time.monotonic()
    r = nodes.login(user, ["srun", "-K", "-N2", "-n4", "--mpi=pmix", "image-mpi", "python3",
                           "-c", prog], env=env_for(site, openmpi_sqfs), cwd=jobdir,
                    timeout=100)
    took = time.monotonic() - t0
    assert r.returncode != 0 and took < 90, (took, r.stderr)
    assert r.stdout.count("up ") == 4, r.stdout
    assert nodes.leftovers(user, timeout=30) == {}


def test_mpi_doctor_on_a_compute_node(nodes, user, site, jobdir, openmpi_sqfs):
    r = nodes.login(user, ["srun", "-N1", "-w", "n2", *cli_argv("mpi", "doctor")],
                    env=env_for(site, openmpi_sqfs), cwd=jobdir)
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"image: {openmpi_sqfs}" in r.stdout
    assert "ok    hybrid: the image's Open MPI" in r.stdout, r.stdout
    assert nodes.leftovers(user) == {}


def test_four_nodes_one_container_each(nodes, user, site, jobdir, openmpi_sqfs):
    four = start(4)
    r = four.login(user, ["srun", "-N4", "-n8", "--mpi=pmix", "image-mpi", "python3",
                          "nodes_check.py"], env=env_for(site, openmpi_sqfs), cwd=jobdir)
    assert r.returncode == 0, r.stderr
    check_rows(r.stdout, 8, ["n1", "n2", "n3", "n4"])
    assert four.leftovers(user) == {}
