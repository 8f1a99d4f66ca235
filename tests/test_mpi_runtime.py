"""image-mpi's runtime side without a real MPI: argument splitting, launcher choice,
rank environment, and the shared namespaces of the ranks of one job on one node
(ranks simulated by processes carrying a launcher's variables)."""
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from conftest import PY, runtime_argv, fuse_processes, wait_no_leaks
from hpcimage.runtime.mpi import launcher as mpi
from hpcimage.runtime.mpi import jobenv, rank, shared


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
    # The job's state directory (JOB-STEP@NODE) goes, and the user's directory with it:
    # nothing of the job is left in /tmp.
    base = f"/tmp/hpcimage-{user.uid}"
    deadline = time.monotonic() + 5
    while os.path.exists(base) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not os.path.exists(base), os.listdir(base)


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
        holder = int(open(f"/tmp/hpcimage-{user.uid}/{job}-0@{os.uname().nodename}/holder").read())
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


# ------------------------------------------- one flag table; the joiner's decisions

def test_one_flag_table_reaches_the_parser_image_mpi_and_the_joiner():
    """Every option the runtime's parser accepts is in options.FLAGS, image-mpi's split
    knows it (its own, passed to the ranks, or the launcher's), and the recipe gives
    hpcimage-join exactly the table."""
    from types import SimpleNamespace
    from hpcimage.runtime import options
    from hpcimage.errors import HpcimageError
    from hpcimage.runtime.mpi import recipe
    table = {name for name, *_ in options.FLAGS}
    assert set(options._FLAGS) | set(options._VALUED) == table
    for name, attr, valued, where, *_ in options.FLAGS:
        assert where in ("ranks", "image-mpi", "launcher")
        assert (name in mpi.OUR_LONG) != (name in options.LAUNCHERS), name
        if name in mpi.OUR_LONG:
            assert mpi.OUR_LONG[name] == valued
        words = [name, "hybrid" if attr == "mpi_mode" else "A=1"] if valued else [name]
        if attr == "instance":      # a rank never joins an instance: refused by name
            with pytest.raises(HpcimageError, match="^--instance: image-mpi"):
                options.parse(["image-mpi-rank", *words, "prog"], {"HPCIMAGE_IMAGE": "/x"})
            continue
        o = options.parse(["image-mpi-rank", *words, "prog"], {"HPCIMAGE_IMAGE": "/x"})
        assert o.args == ["prog"] and getattr(o, attr if attr != "bind" else "binds"), name
    assert set(mpi.OUR_LONG) == (table - options.LAUNCHERS) | set(options.IMAGE_MPI_ONLY)
    # image-mpi's split: ours before the program, the launcher's short forms its own
    assert mpi.split_launcher_args(["--bind", "/a", "-n", "2", "prog"]) == (
        ["--bind", "/a", "-n", "2"], ["prog"])
    r = SimpleNamespace(environ={}, vary=(), ignore=(), keep=[], signature="image-mpi\x1f",
                        cwd="/", workdir="/", home="/", explicit=False, prog="image-mpi",
                        script="", direct={}, shell={}, varies=lambda k: False, final=None)
    data = recipe.recipe(r)
    assert data.startswith(b"HPCIMAGE-RECIPE %d\0" % recipe.FORMAT)
    words = data.split(b"\0")[1:-1]
    items = list(zip(words[::2], words[1::2]))
    assert [v.decode() for k, v in items if k == b"switch"] == list(options.SWITCHES)
    assert [v.decode() for k, v in items if k == b"valued"] == list(options.VALUED)
    msgs = [v.decode().split("\x1f") for k, v in items if k == b"message"]
    assert {m[0]: (int(m[1]), m[2]) for m in msgs} == {
        name: (status, "image-mpi: error: " + text)
        for name, (status, text) in recipe.messages().items()}
    src = (Path(__file__).parent.parent / "hpcimage/runtime/mpi/join.c").read_text()
    said = src.split("MESSAGE_NAMES[] = {", 1)[1].split("}", 1)[0]
    assert set(re.findall(r'"(\w+)"', said)) == set(recipe.messages())  # all it may say


JOINER = subprocess.run([PY, "-I", "-c", "import hpcimage.runtime.mpi.recipe as m; "
                         "print(m.JOIN_HELPER)"], capture_output=True, text=True).stdout.strip()
needs_joiner = pytest.mark.skipif(not os.access(JOINER, os.X_OK),
                                  reason="hpcimage-join not built (no C compiler)")


def run_joiner(env, *words, python=("/bin/true",)):
    return subprocess.run([JOINER, *python, *words], env=dict(env, HPCIMAGE_TRACE="1"),
                          capture_output=True, text=True, timeout=30)


@needs_joiner
@pytest.mark.parametrize("env", [
    {"SLURM_JOB_ID": "4711", "SLURM_STEP_ID": "0", "SLURM_PROCID": "3"},
    {"SLURM_JOB_ID": "4711", "SLURM_STEPID": "2", "PMIX_RANK": "1",
     "PMIX_NAMESPACE": "slurm.pmix.4711.2"},                         # Slurm first
    {"PMIX_RANK": "0", "PMIX_NAMESPACE": "prterun-node01-12345@1"},  # Open MPI 5 / PRRTE
    {"OMPI_COMM_WORLD_RANK": "2", "OMPI_MCA_ess_base_jobid": "3042312193"},
    {"OMPI_COMM_WORLD_RANK": "2", "OMPI_MCA_orte_ess_jobid": "1234:1"},   # Open MPI 3/4
    {"PMI_RANK": "1", "PMI_KVSNAME": "kvs_28473_0"},                 # MPICH (hydra)
    {"PMI_FD": "5", "PMI_ID_SPACE": "a b/c"},
    {"PMIX_RANK": "0", "HPCIMAGE_MPI_KEY": "launch-n1-99-abc", "SLURM_JOB_ID": "1",
     "SLURM_STEP_ID": "0"},                                           # image-mpi's own
    {"PMIX_RANK": "0", "PMIX_NAMESPACE": "x" * 200 + "é"},           # cut at KEY_MAX
    {"PMIX_RANK": "0"},                                               # no key
])
def test_joiner_rank_test_and_job_key_are_jobenv_s(env, tmp_path):
    """hpcimage-join is compiled with jobenv's tables: its rank test and job key are
    jobenv.is_rank and jobenv.job_key."""
    env = dict(env, PATH="/usr/bin:/bin", HPCIMAGE_MPI_STATE=str(tmp_path))
    r = run_joiner(env, "image-mpi", "prog")                  # the wrapper form
    assert r.returncode == 0, r.stderr
    keys = [ln.split(": job key ", 1)[1] for ln in r.stderr.splitlines() if ": job key " in ln]
    expected = jobenv.job_key(env)
    assert jobenv.is_rank(env)
    if expected is None:
        assert keys == [] and "Python rank: no job key in the environment" in r.stderr
    else:
        assert keys == [expected], r.stderr
        # The joiner makes the user's state directory as shared.state_base() does
        # (the last holder of a node removes it), then finds no holder for the job.
        assert "Python rank: no holder yet (this rank starts it)" in r.stderr
        base = tmp_path / f"hpcimage-{os.getuid()}"
        assert base.is_dir() and (base.stat().st_mode & 0o777) == 0o700


@needs_joiner
@pytest.mark.parametrize("env", [{"SLURM_JOB_ID": "5"},
                                 {"SLURM_JOB_ID": "5", "SLURM_STEP_ID": "4294967294"},
                                 {"SLURM_JOB_ID": "5", "SLURM_STEP_ID": "0x1"},
                                 {"SLURM_JOB_ID": "5", "PMIX_RANK": ""}])
def test_joiner_leaves_non_ranks_to_python_at_once(env, tmp_path):
    """The wrapper form, not a rank by jobenv.is_rank: the launcher side, Python at once."""
    assert not jobenv.is_rank(env)
    r = run_joiner(dict(env, HPCIMAGE_MPI_STATE=str(tmp_path)), "image-mpi", "prog")
    assert r.returncode == 0 and r.stderr == "", r.stderr


def fake_job(tmp_path, key, data):
    """A state directory as a holder leaves it: refs, a live holder (this process), the
    recipe."""
    state = tmp_path / f"hpcimage-{os.getuid()}" / shared.state_name(key)
    state.mkdir(parents=True)
    state.parent.chmod(0o700)
    (state / "refs").write_text("")
    (state / "holder").write_text(str(os.getpid()))
    (state / "recipe").write_bytes(data)


@needs_joiner
def test_joiner_refuses_a_recipe_of_another_format(tmp_path):
    """A recipe of another format version is not used: the rank runs as Python and
    HPCIMAGE_TRACE says why. A recipe of this version is read (here: made for other
    options)."""
    from types import SimpleNamespace
    from hpcimage.runtime.mpi import recipe
    r = SimpleNamespace(environ={}, vary=(), ignore=(), keep=[], signature="--nv\x1f",
                        cwd="/", workdir="/", home="/", explicit=False, prog="image-mpi",
                        script="", direct={}, shell={}, varies=lambda k: False, final=None)
    current = recipe.recipe(r)
    old = b"HPCIMAGE-RECIPE 1\0" + current.split(b"\0", 1)[1]
    env = {"PATH": "/usr/bin:/bin", "HPCIMAGE_MPI_STATE": str(tmp_path), "PMIX_RANK": "1",
           "HPCIMAGE_MPI_KEY": "job1"}
    python = (PY, "-I", "-c", "import sys; print('python rank', sys.argv[1:])")
    words = ("image-mpi-rank", "--mpi-mode", "hybrid", "--", "true")
    fake_job(tmp_path, "job1", old)
    p = run_joiner(env, *words, python=python)
    assert p.returncode == 0, p.stderr
    assert p.stdout.startswith("python rank ['image-mpi-rank', '--mpi-mode', 'hybrid'")
    assert ("Python rank: no usable recipe: recipe of another format "
            f"(HPCIMAGE-RECIPE {recipe.FORMAT} is read here)") in p.stderr, p.stderr
    (tmp_path / f"hpcimage-{os.getuid()}" / shared.state_name("job1") / "recipe").write_bytes(current)
    p = run_joiner(env, *words, python=python)
    assert p.returncode == 0 and p.stdout.startswith("python rank"), p.stderr
    assert "Python rank: recipe made for other options" in p.stderr, p.stderr


@needs_joiner
@pytest.mark.parametrize("words, sig, workdir, said", [
    (["--env", "A=1", "-B/x", "--", "prog"], ["--env", "A=1", "-B/x", "--"], "/",
     (127, "image-mpi: error: prog: command not found in the image (PATH=)")),
    (["--bind", "/a", "--nv", "prog"], ["--bind", "/a", "--nv"], "/",
     (127, "image-mpi: error: prog: command not found in the image (PATH=)")),
    (["--pwd", "/no/such", "./prog"], ["--pwd", "/no/such"], "/no/such",
     (2, "image-mpi: error: --pwd /no/such: no such directory in the container")),
    (["--env", "A=1", "--nv", "prog"], ["--env", "A=1"], "/", "recipe made for other options"),
    (["--env", "A=1"], ["--env", "A=1"], "/", "recipe made for other options"),
    (["--env", "A=1", "--bogus", "prog"], ["--env", "A=1"], "/", "recipe made for other options"),
])
def test_joiner_reads_wrapper_options_with_the_recipe_s_table(words, sig, workdir, said,
                                                              tmp_path):
    """`srun image-mpi [OPTIONS] PROGRAM`: the joiner reads the option words with the
    recipe's table, as the runtime's parser does, and joins only when they are exactly
    the planning rank's; its errors are the recipe's messages. (The holder here is this
    test's own process: joining its namespaces changes nothing.)"""
    from types import SimpleNamespace
    from hpcimage.runtime.mpi import recipe
    env = {"PATH": "/usr/bin:/bin", "HPCIMAGE_MPI_STATE": str(tmp_path), "PMIX_RANK": "1",
           "HPCIMAGE_MPI_KEY": "job2", "HPCIMAGE_TRACE": "1"}
    r = SimpleNamespace(environ=env, vary=("PMIX_",), ignore=(), keep=[],
                        signature="".join(w + "\x1f" for w in ["image-mpi", *sig]),
                        cwd=str(tmp_path), workdir=workdir, home="/",
                        explicit=workdir != "/", prog="image-mpi", script="", direct={},
                        shell={}, varies=lambda k: k.startswith("PMIX_"), final=None)
    fake_job(tmp_path, "job2", recipe.recipe(r))
    p = subprocess.run([JOINER, "/bin/true", "image-mpi", *words], env=env, cwd=str(tmp_path),
                       capture_output=True, text=True, timeout=30)
    if isinstance(said, str):
        assert p.returncode == 0 and f"Python rank: {said}" in p.stderr, p.stderr
    else:
        assert "Python rank" not in p.stderr, p.stderr           # joined, then failed
        assert (p.returncode, p.stderr.splitlines()[-1]) == said, p.stderr


def test_dead_holders_state_is_swept_and_state_dir_off_tmp(user, demo_sqfs):
    """A holder killed by SIGKILL leaves its state directory; the next job's first rank
    on the node removes it (no holder, no rank holding it). With HPCIMAGE_MPI_STATE
    outside /tmp (not bound in the container) the holder still tears down: it holds its
    state by descriptors opened before pivot_root."""
    state = Path(tempfile.mkdtemp(prefix="hpcimage-mpistate-", dir="/var/tmp"))
    try:
        _swept(user, demo_sqfs, state)
    finally:
        shutil.rmtree(state, ignore_errors=True)


def _swept(user, demo_sqfs, state):
    os.chown(state, user.uid, user.gid)
    base = state / f"hpcimage-{user.uid}"
    stale = base / f"deadjob-0@{os.uname().nodename}"
    stale.mkdir(parents=True)
    (stale / "holder").write_text("999999999")
    (stale / "refs").write_text("")
    for p in (base, stale, stale / "holder", stale / "refs"):
        os.chown(p, user.uid, user.gid)
    base.chmod(0o700)
    job = f"s{os.getpid()}{time.monotonic_ns() % 100000}"
    procs = start_ranks(user, str(demo_sqfs), 2, job, hold=lambda i: "0.2",
                        extra_env={"HPCIMAGE_MPI_STATE": str(state)})
    outs = [p.communicate(timeout=60) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1] for o in outs]
    first = [o[0].splitlines()[0].split(" ", 3) for o in outs]
    assert len({f[1] for f in first}) == 1, "the ranks shared one container"
    deadline = time.monotonic() + 5
    while base.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not base.exists(), list(base.iterdir())
    assert wait_no_leaks(user.uid) == ([], [])


def test_state_directory_that_cannot_be_made_is_one_line(user, demo_sqfs):
    procs = start_ranks(user, str(demo_sqfs), 1, "nostate", hold=lambda i: "0",
                        extra_env={"HPCIMAGE_MPI_STATE": "/proc/nonexistent"})
    out, err = procs[0].communicate(timeout=60)
    assert procs[0].returncode == 1
    assert err == (f"image-mpi: error: cannot make the MPI state directory "
                   f"/proc/nonexistent/hpcimage-{user.uid}: No such file or directory "
                   "(HPCIMAGE_MPI_STATE)\n"), err


GPU_CMD = ('echo "$PMIX_RANK $(ls /dev | grep -E \'^nvidia[0-9]$\' | tr \'\\n\' \' \')'
           '$(readlink /proc/self/ns/mnt)"; sleep "$HOLD"')


def test_ranks_asking_for_other_devices_get_a_container_made_for_them(user, demo_sqfs):
    """Ranks of one job on a node that differ (each task its own GPU:
    CUDA_VISIBLE_DEVICES=$SLURM_LOCALID) do not join the first rank's container: those
    asking for the same share one made for it, each sees only its GPU, and all of it
    goes when they end."""
    import fakehost
    root = tempfile.mkdtemp(prefix="hpcimage-fakehost-", dir="/var/tmp")
    os.chmod(root, 0o755)
    try:
        fakehost.build(root)
        job = f"g{os.getpid()}{time.monotonic_ns() % 100000}"
        procs = []
        for i in range(4):
            env = {"HPCIMAGE_IMAGE": str(demo_sqfs), "SLURM_JOB_ID": job, "SLURM_STEP_ID": "0",
                   "PMIX_RANK": str(i), "HOLD": "2", "HPCIMAGE_HOST_ROOT": root,
                   "CUDA_VISIBLE_DEVICES": str(i % 2)}
            procs.append(user.popen(runtime_argv("image-mpi", "--nv", "sh", "-c", GPU_CMD),
                                    env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    text=True))
        outs = [p.communicate(timeout=60) for p in procs]
        assert all(p.returncode == 0 for p in procs), [o[1] for o in outs]
        rows = sorted(o[0].split() for o in outs)
        assert [r[:2] for r in rows] == [["0", "nvidia0"], ["1", "nvidia1"],
                                         ["2", "nvidia0"], ["3", "nvidia1"]], rows
        assert rows[0][2] == rows[2][2] and rows[1][2] == rows[3][2], rows
        assert rows[0][2] != rows[1][2], "one container per device set"
        notes = [ln for o in outs for ln in o[1].splitlines() if "gets one of its own" in ln]
        assert len(notes) == 1, [o[1] for o in outs]
        base = f"/tmp/hpcimage-{user.uid}"
        deadline = time.monotonic() + 5
        while os.path.exists(base) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not os.path.exists(base), os.listdir(base)
        assert wait_no_leaks(user.uid) == ([], [])
    finally:
        shutil.rmtree(root, ignore_errors=True)


@pytest.mark.parametrize("env, n", [
    ({"SLURM_STEP_TASKS_PER_NODE": "4", "SLURM_NODEID": "0"}, 4),
    ({"SLURM_STEP_TASKS_PER_NODE": "2(x3),1", "SLURM_NODEID": "2"}, 2),
    ({"SLURM_STEP_TASKS_PER_NODE": "2(x3),1", "SLURM_NODEID": "3"}, 1),
    ({"SLURM_STEP_TASKS_PER_NODE": "2(x3),1", "SLURM_NODEID": "4"}, 0),
    ({"SLURM_STEP_TASKS_PER_NODE": "2(x3", "SLURM_NODEID": "0"}, 0),
    ({"SLURM_STEP_TASKS_PER_NODE": "8"}, 0),
    ({"OMPI_COMM_WORLD_LOCAL_SIZE": "16", "SLURM_STEP_TASKS_PER_NODE": "4",
      "SLURM_NODEID": "0"}, 16),
    ({"MPI_LOCALNRANKS": "3"}, 3),
    ({}, 0),
])
def test_local_tasks_the_ranks_a_node_expects(env, n):
    from hpcimage.runtime.mpi.jobenv import local_tasks
    assert local_tasks(env) == n
