"""image-mpi's runtime side without a real MPI: argument splitting, launcher choice,
rank environment, and the shared namespaces of the ranks of one job on one node
(ranks simulated by processes carrying a launcher's variables)."""
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from conftest import runtime_argv, fuse_processes, wait_no_leaks
from hpcimage.runtime.mpi import launcher as mpi
from hpcimage.runtime.mpi import jobenv, rank


@pytest.mark.parametrize("args,opts,prog", [
    (["-n", "4", "--map-by", "core", "./solver", "-x", "1"],
     ["-n", "4", "--map-by", "core"], ["./solver", "-x", "1"]),
    (["--mca", "btl", "self,vader", "-np", "2", "./a"], ["--mca", "btl", "self,vader", "-np", "2"], ["./a"]),
    (["--oversubscribe", "-n=3", "--", "-weird-name"], ["--oversubscribe", "-n=3"], ["-weird-name"]),
    (["./a", "-n", "2"], [], ["./a", "-n", "2"]),
])
def test_split_launcher_args(args, opts, prog):
    assert mpi.split_launcher_args(args) == (opts, prog)


def test_rank_detection_and_job_key():
    assert not jobenv.is_rank({"SLURM_JOB_ID": "5"})                  # batch script
    assert not jobenv.is_rank({"SLURM_JOB_ID": "5", "SLURM_STEP_ID": "4294967294"})
    assert jobenv.is_rank({"SLURM_JOB_ID": "5", "SLURM_STEP_ID": "0"})
    assert jobenv.is_rank({"PMIX_RANK": "3"}) and jobenv.is_rank({"OMPI_COMM_WORLD_RANK": "0"})
    assert jobenv.job_key({"SLURM_JOB_ID": "5", "SLURM_STEP_ID": "1"}) == "5-1"
    assert jobenv.job_key({"PMIX_NAMESPACE": "prterun-host-123@1"}) == "prterun-host-123_1"
    assert jobenv.job_key({}) is None
    assert rank.rank_environ({"PMIX_PTL_MODULE": "tcp", "PMIX_MCA_psec": "x",
                             "PMIX_SECURITY_MODE": "native"}) == {"PMIX_MCA_ptl": "tcp"}


@pytest.mark.parametrize("words, sig", [
    (["./solver", "-x"], "image-mpi\x1f"),
    (["--env", "A=1", "--", "-weird"], "image-mpi\x1f--env\x1fA=1\x1f--\x1f"),
    (["--bind", "--", "prog"], "image-mpi\x1f--bind\x1f--\x1f"),   # "--" as a value
    (["-B/a,/b", "--cleanenv", "prog", "--", "x"], "image-mpi\x1f-B/a,/b\x1f--cleanenv\x1f"),
    (["--env", "A=\x1f", "prog"], None),
])
def test_wrapper_signature_is_the_words_the_parser_took(words, sig):
    """What hpcimage-join matches a `srun image-mpi ...` rank against: "image-mpi" and
    exactly the option words the runtime's parser took (with a separating `--`)."""
    from hpcimage.runtime import options
    opts = options.parse(["image-mpi-rank", *words], {"HPCIMAGE_IMAGE": "/x"})
    assert rank.wrapper_signature(words, opts) == sig


@pytest.fixture
def fake_launchers(userdir):
    bindir = userdir / "bin"
    bindir.mkdir()
    for name in ("srun", "mpirun"):
        p = bindir / name
        p.write_text(f'#!/bin/sh\necho {name} "$@"\n')
        p.chmod(0o755)
    return bindir


def test_launcher_choice(user, demo_sqfs, fake_launchers):
    env = {"HPCIMAGE_IMAGE": str(demo_sqfs), "PATH": f"{fake_launchers}:/usr/bin:/bin"}
    r = user.run(runtime_argv("image-mpi", "-n", "4", "--map-by", "core", "--bind",
                              "/tmp:/x", "./solver", "a b"), env=env)
    assert r.returncode == 0, r.stderr
    words = r.stdout.split()
    assert words[:5] == ["mpirun", "-n", "4", "--map-by", "core"]
    assert "image-mpi-rank" in words and words[-3:] == ["./solver", "a", "b"]
    assert words[words.index("image-mpi-rank"):][:5] == ["image-mpi-rank", "--mpi-mode", "hybrid",
                                                        "--bind", "/tmp:/x"]
    r = user.run(runtime_argv("image-mpi", "--mpi-mode", "bind", "./solver"),
                 env=dict(env, SLURM_JOB_ID="42"))
    assert r.stdout.split()[0] == "srun" and "bind" in r.stdout.split()
    r = user.run(runtime_argv("image-mpi", "-n", "2"), env=env)
    assert r.returncode == 2 and "no program given" in r.stderr
    r = user.run(runtime_argv("image-mpi", "--mpi-mode", "magic", "./a"), env=env)
    assert r.returncode == 2 and "--mpi-mode wants hybrid or bind" in r.stderr
    r = user.run(runtime_argv("image-mpi", "./a"), env={"PATH": "/usr/bin:/bin"})
    assert r.returncode == 2 and "no image module loaded" in r.stderr
    r = user.run(runtime_argv("image-mpi", "-n", "2", "./a"),
                 env={"HPCIMAGE_IMAGE": str(demo_sqfs), "PATH": "/nonexistent"})
    assert r.returncode == 1 and "launcher 'mpirun' not found" in r.stderr


RANK_CMD = ('echo "$PMIX_RANK $(readlink /proc/self/ns/user) $(readlink /proc/self/ns/mnt) '
            '$(head -1 /etc/os-release)"; [ -z "$MARKS" ] || touch "$MARKS/$PMIX_RANK"; '
            'sleep "$HOLD"; head -1 /etc/os-release')


def start_ranks(user, image, n, job, extra_env=None, hold=lambda i: "0.5"):
    procs = []
    for i in range(n):
        env = {"HPCIMAGE_IMAGE": image, "SLURM_JOB_ID": job, "SLURM_STEP_ID": "0",
               "PMIX_RANK": str(i), "HOLD": hold(i)}
        env.update(extra_env or {})
        procs.append(user.popen(runtime_argv("image-mpi", "sh", "-c", RANK_CMD), env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    return procs


def test_ranks_share_one_userns_mountns_and_image_mount(user, demo_sqfs):
    job = f"t{os.getpid()}{time.monotonic_ns() % 100000}"
    marks = Path(f"/tmp/hpcimage-tests/marks-{job}")
    marks.mkdir(parents=True)
    os.chown(marks, user.uid, user.gid)
    # rank 0 leaves early: the others keep a working image.
    procs = start_ranks(user, str(demo_sqfs), 8, job, extra_env={"MARKS": str(marks)},
                        hold=lambda i: "0.1" if i == 0 else "3")
    deadline = time.monotonic() + 60
    while len(os.listdir(marks)) < 8 and time.monotonic() < deadline:
        time.sleep(0.05)
    daemons = fuse_processes(user.uid)
    shutil.rmtree(marks, ignore_errors=True)
    outs = [p.communicate(timeout=60) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1] for o in outs]
    first = [o[0].splitlines()[0].split(" ", 3) for o in outs]
    assert sorted(int(f[0]) for f in first) == list(range(8))
    assert len({f[1] for f in first}) == 1, "one user namespace for all ranks"
    assert len({f[2] for f in first}) == 1, "one mount namespace for all ranks"
    assert all(o[0].splitlines()[1] == 'NAME="hpcimage Demo"' for o in outs)
    assert len(daemons) == 1, f"one image mount for the node, not {daemons}"
    procs_left, mounts = wait_no_leaks(user.uid)
    assert procs_left == [] and mounts == []
    deadline = time.monotonic() + 5
    while os.path.exists(f"/tmp/hpcimage-{user.uid}/{job}-0") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not os.path.exists(f"/tmp/hpcimage-{user.uid}/{job}-0")


def test_ranks_without_sharing_get_own_namespaces_and_no_cma(user, demo_dir):
    procs = start_ranks(user, str(demo_dir), 2, "noshare",
                        extra_env={"HPCIMAGE_MPI_SHARE": "0"}, hold=lambda i: "0.3")
    outs = [p.communicate(timeout=60) for p in procs]
    users = {o[0].split()[1] for o in outs}
    assert len(users) == 2
    r = user.run(runtime_argv("image-mpi", "sh", "-c", "echo $OMPI_MCA_btl_vader_single_copy_mechanism"),
                 env={"HPCIMAGE_IMAGE": str(demo_dir), "PMIX_RANK": "0", "HPCIMAGE_MPI_SHARE": "0"})
    assert r.stdout.strip() == "none"


def test_rank_env_forwarded_under_cleanenv_and_pmix_dir_bound(user, demo_dir):
    pmixdir = "/var/tmp/hpcimage-test-pmix"
    os.makedirs(pmixdir, exist_ok=True)
    os.chmod(pmixdir, 0o777)
    try:
        r = user.run(runtime_argv("image-mpi", "--cleanenv", "sh", "-c",
                                  'echo "$PMIX_RANK|$SLURM_JOB_ID|$UCX_TLS|$PMIX_MCA_gds|$MYVAR"; '
                                  f'ls -d {pmixdir}'),
                     env={"HPCIMAGE_IMAGE": str(demo_dir), "PMIX_RANK": "0", "SLURM_JOB_ID": "9",
                          "UCX_TLS": "sm", "PMIX_GDS_MODULE": "hash", "MYVAR": "dropped",
                          "PMIX_SERVER_TMPDIR": pmixdir, "HPCIMAGE_MPI_SHARE": "0"})
    finally:
        os.rmdir(pmixdir)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == ["0|9|sm|hash|", pmixdir]


def test_step_signal_leaves_the_shared_container_served(user, demo_sqfs):
    """USR1 to every process of the job on the node (what `scancel --signal=USR1` and
    `--signal=USR1@60` do through Slurm's cgroup: the ranks, the holder and its
    squashfuse): the ranks' handlers still read the image; all goes when they exit."""
    job = f"sig{os.getpid()}{time.monotonic_ns() % 100000}"
    prog = ('trap \'head -1 /etc/os-release; exit 0\' USR1; echo ready; '
            'i=0; while [ $i -lt 200 ]; do sleep 0.1; i=$((i+1)); done; exit 3')
    procs = []
    for i in range(2):
        env = {"HPCIMAGE_IMAGE": str(demo_sqfs), "SLURM_JOB_ID": job, "SLURM_STEP_ID": "0",
               "PMIX_RANK": str(i)}
        procs.append(user.popen(runtime_argv("image-mpi", "sh", "-c", prog), env=env,
                                start_new_session=True, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True))
    try:
        for p in procs:
            assert p.stdout.readline() == "ready\n"
        holder = int(open(f"/tmp/hpcimage-{user.uid}/{job}-0/holder").read())
        daemons = fuse_processes(user.uid)
        assert len(daemons) == 1
        for pid in [holder] + daemons:
            os.kill(pid, signal.SIGUSR1)
        for p in procs:
            os.killpg(p.pid, signal.SIGUSR1)
        outs = [p.communicate(timeout=30) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.communicate()
    assert [p.returncode for p in procs] == [0, 0], [o[1] for o in outs]
    assert all(o[0] == 'NAME="hpcimage Demo"\n' for o in outs), outs
    assert wait_no_leaks(user.uid) == ([], [])
