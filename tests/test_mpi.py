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
                      mpich_sqfs,
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


# ------------------------------------------------ hpcimage-join: no Python per rank

JOIN_CMD = ('echo "r $OMPI_COMM_WORLD_RANK $PMIX_RANK $(readlink /proc/self/ns/user) '
            '${HPCIMAGE_DEBIAN_ENV:-unset} ${PMIX_SECURITY_MODE:-x} ${PMIX_MCA_psec:-none} '
            '${FOO:-nofoo} $PWD"')


def joiner_lines(stderr):
    joined = [ln for ln in stderr.splitlines() if ln.startswith("hpcimage-join: ")
              and "joined holder" in ln]
    python = [ln for ln in stderr.splitlines() if ln.startswith("hpcimage-join: ")
              and "Python rank" in ln]
    return joined, python


def state_entries(user):
    base = f"/tmp/hpcimage-{user.uid}"
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        left = os.listdir(base) if os.path.isdir(base) else []
        if not left:
            break
        time.sleep(0.05)
    return left


def rows_of(out):
    return sorted(ln.split()[1:] for ln in out.splitlines() if ln.startswith("r "))


def test_mpirun_ranks_join_through_hpcimage_join(user, host_mpi, site, openmpi_sqfs, userdir):
    """Outside Slurm image-mpi prepares the node's container while mpirun starts; every
    rank joins it through the compiled hpcimage-join, with its own rank variables, the
    image's env script, the PMIx translation and the user's directory."""
    r = user.run(["image-mpi", "-n", "4", "--oversubscribe", "sh", "-c", JOIN_CMD],
                 env=dict(env_for(site, openmpi_sqfs), HPCIMAGE_TRACE="1"), cwd=str(userdir),
                 timeout=120)
    assert r.returncode == 0, r.stderr
    rows = rows_of(r.stdout)
    assert [row[0] for row in rows] == ["0", "1", "2", "3"], r.stdout
    assert all(row[0] == row[1] for row in rows)                     # PMIX_RANK, per rank
    assert len({row[2] for row in rows}) == 1                        # one user namespace
    assert all(row[3] == "1" for row in rows)                        # 90-environment.sh
    assert all(row[4] != "x" and row[5] == row[4] for row in rows)   # PMIX_MCA_psec
    assert all(row[7] == str(userdir) for row in rows)
    joined, python = joiner_lines(r.stderr)
    assert len(joined) == 4 and python == [], r.stderr
    assert all("(the probed environment)" in ln for ln in joined), joined
    procs, mounts = wait_no_leaks(user.uid)
    assert procs == [] and mounts == []
    assert state_entries(user) == []


def test_joiner_falls_back_to_python_ranks(user, host_mpi, site, openmpi_sqfs, userdir):
    """A rank whose environment differs from the one planned (here `-x FOO=bar`) and
    HPCIMAGE_MPI_JOIN=0 both take the Python rank: same results, same shared container."""
    env = dict(env_for(site, openmpi_sqfs), HPCIMAGE_TRACE="1")
    r = user.run(["image-mpi", "-n", "3", "--oversubscribe", "-x", "FOO=bar", "sh", "-c",
                  JOIN_CMD], env=env, cwd=str(userdir), timeout=120)
    assert r.returncode == 0, r.stderr
    rows = rows_of(r.stdout)
    assert [row[0] for row in rows] == ["0", "1", "2"] and all(row[6] == "bar" for row in rows)
    assert len({row[2] for row in rows}) == 1
    joined, python = joiner_lines(r.stderr)
    assert joined == [] and len(python) == 3
    assert all("recipe made for another environment" in ln for ln in python), python
    r = user.run(["image-mpi", "-n", "3", "--oversubscribe", "sh", "-c", JOIN_CMD],
                 env=dict(env, HPCIMAGE_MPI_JOIN="0"), cwd=str(userdir), timeout=120)
    assert r.returncode == 0, r.stderr
    rows = rows_of(r.stdout)
    assert [row[0] for row in rows] == ["0", "1", "2"] and len({row[2] for row in rows}) == 1
    assert "hpcimage-join" not in r.stderr
    assert state_entries(user) == []


def test_srun_wrapper_ranks_join_through_hpcimage_join(user, slurm_cluster, site, openmpi_sqfs,
                                                       userdir):
    """`srun image-mpi PROGRAM` (no `--`): the node's first rank sets the container up,
    the others join it through hpcimage-join from the wrapper, each with its own rank
    and Slurm variables (Slurm sets TMPDIR for the first task only)."""
    wrapper = (site / "wrappers" / "image-mpi").read_text()
    assert "runtime/mpi/hpcimage-join" in wrapper
    r = srun(user, ["image-mpi", "--env", "FOO=bar", "sh", "-c",
                    JOIN_CMD + '; echo "t $PMIX_RANK $SLURM_PROCID"'], n=4, mpi="pmix",
             env=dict(env_for(site, openmpi_sqfs), HPCIMAGE_TRACE="1"), cwd=str(userdir))
    assert r.returncode == 0, r.stderr
    rows = sorted(ln.split()[1:] for ln in r.stdout.splitlines() if ln.startswith("r "))
    assert [row[0] for row in rows] == ["0", "1", "2", "3"], r.stdout
    assert len({row[1] for row in rows}) == 1                        # one user namespace
    assert all(row[2] == "1" and row[5] == "bar" and row[6] == str(userdir) for row in rows)
    assert all(row[4] != "none" for row in rows)                     # PMIX_MCA_psec
    tasks = sorted(ln.split()[1:] for ln in r.stdout.splitlines() if ln.startswith("t "))
    assert tasks == [[str(i), str(i)] for i in range(4)], r.stdout
    joined, python = joiner_lines(r.stderr)
    assert len(joined) == 3 and len(python) == 1, r.stderr
    assert "no holder yet" in python[0]
    procs, mounts = wait_no_leaks(user.uid)
    assert procs == [] and mounts == []
    assert state_entries(user) == []
    r = srun(user, ["image-mpi", "sh", "-c", 'echo "t $PMIX_RANK"'], n=2, mpi="pmix",
             env=dict(env_for(site, openmpi_sqfs), HPCIMAGE_TRACE="1", HPCIMAGE_MPI_JOIN="0"),
             cwd=str(userdir))
    assert r.returncode == 0 and sorted(r.stdout.split()) == ["0", "1", "t", "t"], r.stderr
    assert "hpcimage-join" not in r.stderr                          # switched off


def test_srun_wrapper_ranks_with_other_options_do_not_join(user, slurm_cluster, site,
                                                           openmpi_sqfs, userdir):
    """--multi-prog: ranks whose options differ from the planning rank's take the
    Python rank, whichever rank planned; each gets its own options."""
    conf = userdir / "multi.conf"
    conf.write_text("0 image-mpi --env FOO=zero sh -c 'echo \"m $PMIX_RANK ${FOO:-none}\"'\n"
                    "1-2 image-mpi sh -c 'echo \"m $PMIX_RANK ${FOO:-none}\"'\n")
    r = srun(user, ["--multi-prog", str(conf)], n=3, mpi="pmix",
             env=dict(env_for(site, openmpi_sqfs), HPCIMAGE_TRACE="1"), cwd=str(userdir))
    assert r.returncode == 0, r.stderr
    rows = sorted(ln.split()[1:] for ln in r.stdout.splitlines() if ln.startswith("m "))
    assert rows == [["0", "zero"], ["1", "none"], ["2", "none"]], r.stdout + r.stderr
    joined, python = joiner_lines(r.stderr)
    assert len(joined) + len(python) == 3
    assert any("recipe made for other options" in ln for ln in python), r.stderr
    procs, mounts = wait_no_leaks(user.uid)
    assert procs == [] and mounts == []


def test_joiner_env_scripts_reading_rank_variables(user, host_mpi, userdir):
    """An image whose env script reads a per-rank variable: the holder's probe sees it,
    so every rank runs the scripts itself (/bin/sh) and gets its own value; an image
    whose scripts do not gets the probed environment."""
    for name, line in (("perrank", "export MYRANK=r$OMPI_COMM_WORLD_RANK"),
                       ("static", "export MYRANK=same")):
        d = userdir / f"{name}.def"
        d.write_text(f"Bootstrap: busybox\n%environment\n    {line}\n")
        r = user.run(cli_argv("build", "--sandbox", str(userdir / name), str(d)),
                     cwd=str(userdir))
        assert r.returncode == 0, r.stderr
        r = user.run(runtime_image_mpi(userdir / name, "sh", "-c",
                                       'echo "r $OMPI_COMM_WORLD_RANK $MYRANK"'),
                     env={"PATH": "/usr/local/bin:/usr/bin:/bin", "HPCIMAGE_TRACE": "1",
                          "HPCIMAGE_IMAGE": str(userdir / name)}, cwd=str(userdir), timeout=120)
        assert r.returncode == 0, r.stderr
        rows = rows_of(r.stdout)
        joined, python = joiner_lines(r.stderr)
        assert len(joined) == 3 and python == [], r.stderr
        if name == "perrank":
            assert rows == [["0", "r0"], ["1", "r1"], ["2", "r2"]]
            assert all("(the planned environment)" in ln for ln in joined), joined
        else:
            assert rows == [["0", "same"], ["1", "same"], ["2", "same"]]
            assert all("(the probed environment)" in ln for ln in joined), joined


def runtime_image_mpi(image, *args):
    return [PY, "-I", "-c", "from hpcimage.runtime.main import main; main()", "image-mpi",
            "-n", "3", "--oversubscribe", *args]


def test_joiner_errors_match_the_runtime(user, host_mpi, site, openmpi_sqfs, userdir):
    env = env_for(site, openmpi_sqfs)
    r = user.run(["image-mpi", "-n", "2", "--oversubscribe", "no-such-prog"], env=env,
                 cwd=str(userdir), timeout=120)
    assert r.returncode != 0
    assert "image-mpi: error: no-such-prog: command not found in the image (PATH=" in r.stderr
    r = user.run(["image-mpi", "--pwd", "/no/such/dir", "-n", "2", "--oversubscribe", "true"],
                 env=env, cwd=str(userdir), timeout=120)
    assert r.returncode != 0
    assert "image-mpi: error: --pwd /no/such/dir: no such directory in the container" in r.stderr
    procs, mounts = wait_no_leaks(user.uid)
    assert procs == [] and mounts == []
    assert state_entries(user) == []


# ------------------------------------------- the ranks' process state (issue 12)

STATE_CMD = ('R=${SLURM_PROCID:-$OMPI_COMM_WORLD_RANK}; '
             '{ cat /proc/self/status; echo fds; ls -l /proc/self/fd; } > "$D/st.$R"; '
             'env > "$D/env.$R"')


def rank_states(d, n):
    """[(state, fds, refs fd or None, LC_CTYPE (the image sets LC_ALL))] of ranks 0..n-1."""
    from test_procstate import parse_state
    out = []
    for i in range(n):
        text = (d / f"st.{i}").read_text()
        refs = [int(ln.split(" -> ")[0].split()[-1]) for ln in text.splitlines()
                if ln.endswith("/refs")]
        env = [ln for ln in (d / f"env.{i}").read_text().splitlines() if ln.startswith("LC_CTYPE=")]
        state, fds = parse_state(text)
        out.append((state, fds, refs[0] if refs else None, env))
    return out


def _state_dirs(userdir, user):
    dirs = []
    for name in ("host", "ours"):
        d = userdir / name
        d.mkdir()
        os.chown(d, user.uid, user.gid)
        dirs.append(d)
    return dirs


def _compare_ranks(host, ours, r):
    """Every rank's state equals a host task's; its descriptors too, less the one that
    holds the node's shared container (the job's refs lock, README)."""
    h_state, h_fds, _, h_env = host[0]
    assert h_env == []
    for state, fds, refs, env in ours:
        assert state == h_state, r.stderr
        assert state["SigIgn"] == "0" * 16 and state["SigBlk"] == "0" * 16
        assert [f for f in fds if f != refs] == h_fds, r.stderr
        assert env == [], "no locale added by the interpreter"


def test_srun_rank_state_is_a_host_tasks(user, slurm_cluster, site, openmpi_sqfs, userdir):
    """srun image-mpi with no locale set: the Python rank and the joined ranks start
    as `srun busybox sh` does, and (nothing the interpreter adds reaching the plan)
    the ranks after the first join through hpcimage-join."""
    from test_procstate import as_user, base_env
    hd, od = _state_dirs(userdir, user)
    env = dict(base_env(user), **env_for(site, openmpi_sqfs), HPCIMAGE_TRACE="1")
    r = as_user(user, ["srun", "-n", "3", "--mpi=pmix", "/usr/bin/busybox", "sh", "-c",
                       STATE_CMD.replace("cat ", "busybox cat ").replace("ls ", "busybox ls ")
                       .replace("env ", "busybox env ")], dict(env, D=str(hd)),
                cwd=str(userdir), timeout=120)
    assert r.returncode == 0, r.stderr
    r = as_user(user, ["srun", "-n", "3", "--mpi=pmix", "image-mpi", "sh", "-c", STATE_CMD],
                dict(env, D=str(od)), cwd=str(userdir), timeout=120)
    assert r.returncode == 0, r.stderr
    joined, python = joiner_lines(r.stderr)
    assert len(joined) == 2 and len(python) == 1, r.stderr
    _compare_ranks(rank_states(hd, 3), rank_states(od, 3), r)
    assert wait_no_leaks(user.uid) == ([], [])


def test_mpirun_rank_state_is_a_host_ranks(user, host_mpi, site, openmpi_sqfs, userdir):
    """image-mpi outside Slurm (the launcher execs mpirun; every rank joins through
    hpcimage-join) against the host's mpirun starting busybox sh."""
    from test_procstate import as_user, base_env
    from mpitools import MPIRUN
    hd, od = _state_dirs(userdir, user)
    env = dict(base_env(user), **env_for(site, openmpi_sqfs), HPCIMAGE_TRACE="1")
    r = as_user(user, [MPIRUN["openmpi"], "--oversubscribe", "-n", "2", "/usr/bin/busybox",
                       "sh", "-c", STATE_CMD.replace("cat ", "busybox cat ")
                       .replace("ls ", "busybox ls ").replace("env ", "busybox env ")],
                dict(env, D=str(hd)), cwd=str(userdir), timeout=120)
    assert r.returncode == 0, r.stderr
    r = as_user(user, ["image-mpi", "-n", "2", "--oversubscribe", "sh", "-c", STATE_CMD],
                dict(env, D=str(od)), cwd=str(userdir), timeout=120)
    assert r.returncode == 0, r.stderr
    joined, python = joiner_lines(r.stderr)
    assert len(joined) == 2 and python == [], r.stderr
    _compare_ranks(rank_states(hd, 2), rank_states(od, 2), r)
    assert wait_no_leaks(user.uid) == ([], [])


CONTAINED = ("import os; from mpi4py import MPI; c = MPI.COMM_WORLD; "
             "print('rank', c.rank, 'size', c.size, 'sum', c.allreduce(c.rank + 1), "
             "'tmp', ','.join(sorted(os.listdir('/tmp'))) or '-', flush=True)")


@pytest.mark.parametrize("launcher", ["srun", "mpirun"])
def test_contain_binds_the_pmix_directories_not_the_hosts_tmp(user, slurm_cluster, host_mpi,
                                                              site, openmpi_sqfs, userdir,
                                                              launcher):
    """--contain: a fresh /tmp in every rank; only the job's own PMIx/Open MPI session
    directories come from the host (PMIX_SERVER_TMPDIR, the session directory), never
    the whole /tmp that TMPDIR and PMIX_SYSTEM_TMPDIR name."""
    marker = "hpcimage-host-tmp-marker"
    open(f"/tmp/{marker}", "w").close()
    try:
        if launcher == "srun":
            r = srun(user, ["image-mpi", "--contain", "python3", "-c", CONTAINED], n=2,
                     mpi="pmix", env=env_for(site, openmpi_sqfs), cwd=str(userdir))
        else:
            r = user.run(["image-mpi", "--contain", "-n", "2", "python3", "-c", CONTAINED],
                         env=env_for(site, openmpi_sqfs), cwd=str(userdir))
    finally:
        os.unlink(f"/tmp/{marker}")
    assert r.returncode == 0, r.stderr
    rows = sorted(ln.split() for ln in r.stdout.splitlines() if ln.startswith("rank "))
    assert [x[5] for x in rows] == ["3", "3"], r.stdout
    for x in rows:
        assert marker not in x[7] and "hpcimage-tests" not in x[7], x


BIG = ("from mpi4py import MPI; c = MPI.COMM_WORLD; peer = 1 - c.rank; "
       "got = c.sendrecv(bytes([c.rank]) * (4 << 20), dest=peer, source=peer); "
       "print('rank', c.rank, 'got', got[:1].hex(), len(got), flush=True)")


@pytest.mark.parametrize("launcher", ["mpirun", "srun"])
def test_ranks_under_image_exec_get_cma_off_with_a_warning(user, slurm_cluster, host_mpi,
                                                           site, openmpi_sqfs, userdir,
                                                           launcher):
    """`mpirun image-exec` / `srun image-exec` (not image-mpi): each rank is a container
    of its own, where Open MPI's CMA between ranks hangs on a large message; the runtime
    switches CMA off and rank 0 warns once, naming image-mpi."""
    if launcher == "srun":
        r = srun(user, ["image-exec", "python3", "-c", BIG], n=2, mpi="pmix",
                 env=env_for(site, openmpi_sqfs), cwd=str(userdir), timeout=90)
    else:
        r = user.run(["mpirun.openmpi", "-n", "2", "image-exec", "python3", "-c", BIG],
                     env=env_for(site, openmpi_sqfs), cwd=str(userdir), timeout=90)
    assert r.returncode == 0, r.stderr
    rows = sorted(ln.split() for ln in r.stdout.splitlines() if ln.startswith("rank "))
    assert rows == [["rank", "0", "got", "01", str(4 << 20)],
                    ["rank", "1", "got", "00", str(4 << 20)]], r.stdout
    warnings = [ln for ln in r.stderr.splitlines() if "cross-memory attach" in ln]
    assert len(warnings) == 1 and warnings[0].startswith("image-exec: warning: an MPI rank "
                                                         "in a container of its own"), r.stderr
    assert "image-mpi runs a node's ranks in one container" in warnings[0]


def test_very_short_ranks_started_late_still_share_the_nodes_container(
        user, slurm_cluster, site, openmpi_sqfs, userdir):
    """Ranks that exit at once and start one after the other (rank N waits N/2 s, as
    on a busy node): the node's container waits for the ranks srun starts there
    (SLURM_STEP_TASKS_PER_NODE) rather than going when the ranks so far have exited,
    so every rank joins the first one's; nothing is left afterwards."""
    r = srun(user, ["sh", "-c", 'sleep "0.$((SLURM_PROCID * 5))"; exec image-mpi true'],
             n=3, mpi="pmix", env=dict(env_for(site, openmpi_sqfs), HPCIMAGE_TRACE="1"),
             cwd=str(userdir))
    assert r.returncode == 0, r.stderr
    started = [ln for ln in r.stderr.splitlines()
               if "this rank starts" in ln and ln.startswith("hpcimage-join: ")]
    joined, _python = joiner_lines(r.stderr)
    assert len(started) == 1 and len(joined) == 2, r.stderr
    assert state_entries(user) == []


def test_mpich_ranks_under_image_exec_each_in_its_own_container(user, slurm_cluster, site,
                                                                mpich_sqfs, mpi_hello_mpich,
                                                                userdir):
    """`srun image-exec` with the image's MPICH (ch4:ucx): each rank in a user namespace
    of its own, where UCX (Debian 12: 1.13) attaches a peer's shared memory through
    /proc/PID/fd, which is refused across user namespaces ("Shared memory error" in
    MPI_Init, openucx/ucx#4224); the runtime makes UCX name its segments in /dev/shm
    instead (UCX_POSIX_USE_PROC_LINK=n), keeping shared memory."""
    prog = userdir / "mpi_hello_mpich"
    shutil.copy2(mpi_hello_mpich, prog)
    os.chown(prog, user.uid, user.gid)
    r = srun(user, ["image-exec", str(prog)], n=2, mpi="pmi2",
             env=env_for(site, mpich_sqfs), cwd=str(userdir), timeout=90)
    assert r.returncode == 0, r.stderr
    rows = parse_hello(r.stdout)
    assert [(d["rank"], d["size"], d["sum"]) for d in rows] == [(0, 2, 3), (1, 2, 3)], r.stdout
    assert all(d["version"].startswith("MPICH") for d in rows), r.stdout
    assert "UCX_POSIX_USE_PROC_LINK=n" in r.stderr, r.stderr
    assert "unused" not in r.stderr, r.stderr           # UCX names variables it does not know


def test_joiner_runs_bash_syntax_env_scripts_under_bash(user, host_mpi, site, openmpi_sqfs,
                                                        userdir):
    """An env script in bash's syntax that reads a per-rank variable (no probed
    environment: every rank runs the scripts): the joiner runs it under the image's bash,
    as the Python rank does (command.script_shell)."""
    script = userdir / "95-rank.sh"
    script.write_text('source /etc/os-release\ndeclare -x MYRANK="$ID-$OMPI_COMM_WORLD_RANK"\n')
    script.chmod(0o644)
    r = user.run(["image-mpi", "--bind", f"{script}:/.singularity.d/env/95-rank.sh", "-n", "3",
                  "--oversubscribe",
                  "sh", "-c", 'echo "r $OMPI_COMM_WORLD_RANK $MYRANK"'],
                 env=dict(env_for(site, openmpi_sqfs), HPCIMAGE_TRACE="1"), cwd=str(userdir))
    assert r.returncode == 0, r.stderr
    assert rows_of(r.stdout) == [["0", "debian-0"], ["1", "debian-1"], ["2", "debian-2"]]
    joined, python = joiner_lines(r.stderr)
    assert len(joined) == 3 and all("(the planned environment)" in ln for ln in joined), \
        r.stderr
    assert "not found" not in r.stderr
