"""`hpcimage mpi doctor` with real parts, as the non-root user: Debian's Open MPI and
MPICH on the host, the Debian 12 image with Open MPI (directory, SquashFS, and a SIF
made here), the Debian 12 image without MPI."""
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from conftest import PY, cli_argv
from mpitools import host_mpi, openmpi_dir, openmpi_sqfs, nompi_sqfs, slurm_cluster  # noqa: F401

JOINER = Path(subprocess.run([PY, "-I", "-c", "import hpcimage.runtime.mpi.recipe as m; "
                              "print(m.JOIN_HELPER)"], capture_output=True, text=True,
                             check=True).stdout.strip())


def doctor(user, *args, env=None, cwd=None):
    return user.run(cli_argv("mpi", "doctor", *args), env=env, cwd=cwd, timeout=60)


def section(out, title):
    """The lines of one section of the text report."""
    lines = out.splitlines()
    i = lines.index(title)
    body = []
    for ln in lines[i + 1:]:
        if not ln.strip():
            break
        body.append(ln.strip())
    return body


def mode_line(out, mode):
    return next(ln for ln in section(out, "Modes") if ln.split()[1] == mode + ":")


def test_openmpi_image_both_modes_work(user, host_mpi, openmpi_sqfs):
    r = doctor(user, "--image", str(openmpi_sqfs))
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stderr == ""
    out = r.stdout
    assert out.startswith(f"image: {openmpi_sqfs} (squashfs, from --image)\n")
    # Launcher: outside Slurm, Debian's mpirun, which is Open MPI.
    launcher = section(out, "Launcher")
    assert launcher[0].split()[:3] == ["ok", "mpirun:", "/usr/bin/mpirun"]
    assert "SLURM_JOB_ID unset" in launcher[0]
    assert any(ln.startswith("ok    implementation: openmpi") for ln in launcher)
    assert any("mpirun --version: mpirun (Open MPI) 4.1" in ln for ln in launcher)
    # Host MPI and the image's.
    host = section(out, "Host MPI (bind model)")
    assert host[0].startswith("ok    libmpi.so.40 (Open MPI): "
                              "/usr/lib/x86_64-linux-gnu/libmpi.so.40")
    img = section(out, "Image MPI (hybrid model)")
    assert img == ["ok    libmpi.so.40 (Open MPI): /lib/x86_64-linux-gnu/libmpi.so.40"]
    # Ranks: sharing on, user namespaces work, the joiner the package installed.
    rk = section(out, "Ranks on a node")
    assert rk[0].startswith("ok    sharing on:")
    assert any(ln.startswith("ok    user namespaces:") and "test namespace worked" in ln
               for ln in rk)
    assert any(ln.startswith(f"ok    state directory: /tmp/hpcimage-{user.uid}") for ln in rk)
    if os.access(JOINER, os.X_OK):
        assert f"ok    joiner: {JOINER} (ranks after the first" in out
    else:
        assert "warn  joiner: not built" in out
    assert "OMPI_MCA_btl_vader_single_copy_mechanism" not in out
    # Verdicts.
    assert mode_line(out, "hybrid").startswith("ok    hybrid: the image's Open MPI (libmpi.so.40)")
    assert mode_line(out, "bind").startswith("ok    bind: the host's libmpi.so.40 (Open MPI)")
    assert "a mismatch is refused at launch" in out
    assert out.endswith("result: hybrid and bind work\n")


def test_image_without_mpi_bind_only(user, host_mpi, nompi_sqfs):
    r = doctor(user, env={"HPCIMAGE_IMAGE": nompi_sqfs})      # the loaded module's image
    assert r.returncode == 0, r.stdout + r.stderr
    out = r.stdout
    assert out.startswith(f"image: {nompi_sqfs} (squashfs, from HPCIMAGE_IMAGE)\n")
    img = section(out, "Image MPI (hybrid model)")
    assert img == ["no    no MPI in the image: none of libmpi.so.40, libmpi.so.12, "
                   "libmpich.so.12 in its /etc/ld.so.cache"]
    assert mode_line(out, "hybrid").startswith("no    hybrid: no MPI in the image")
    assert mode_line(out, "bind").startswith("ok    bind:")
    assert out.endswith("result: bind works\n")


def test_sharing_off_lists_per_rank_fallback(user, host_mpi, openmpi_sqfs):
    r = doctor(user, "--image", str(openmpi_sqfs), env={"HPCIMAGE_MPI_SHARE": "0"})
    assert r.returncode == 0, r.stdout + r.stderr
    rk = section(r.stdout, "Ranks on a node")
    assert rk[0].startswith("warn  sharing off (HPCIMAGE_MPI_SHARE=0): each rank gets its own "
                            "namespaces")
    last = next(ln for ln in rk if ln.startswith("info  set for every rank"))
    for kv in ("OMPI_MCA_btl_vader_single_copy_mechanism=none", "OMPI_MCA_smsc=^cma",
               "UCX_TLS_CMA=n", "MPIR_CVAR_CH4_SHM_POSIX_IPC=none"):
        assert kv in last.split()
    assert any(ln.startswith("info  state directory: not used") for ln in rk)
    if os.access(JOINER, os.X_OK):
        assert any(ln.startswith("info  joiner: built but off (HPCIMAGE_MPI_SHARE=0)")
                   for ln in rk)
    rj = doctor(user, "--image", str(openmpi_sqfs), "--json", env={"HPCIMAGE_MPI_SHARE": "0"})
    rep = json.loads(rj.stdout)
    assert rep["ranks"]["share"] is False
    assert rep["ranks"]["per_rank_env"]["OMPI_MCA_btl_vader_single_copy_mechanism"] == "none"


@pytest.mark.parametrize("bad, why", [("missing.sqfs", "image not found"),
                                      ("notimage", "not an image")])
def test_bad_image_is_one_line_exit_2(user, userdir, bad, why):
    path = userdir / bad
    if bad == "notimage":
        path.write_text("hello\n")
    r = doctor(user, "--image", str(path))
    assert r.returncode == 2
    assert r.stdout == ""
    assert r.stderr == f"hpcimage: error: {path}: {why}" + (
        " (neither a directory, a SquashFS file nor a SIF file)\n" if bad == "notimage" else "\n")


def test_json_carries_the_same_verdicts(user, host_mpi, openmpi_sqfs, nompi_sqfs):
    for image, works in ((openmpi_sqfs, ["hybrid", "bind"]), (nompi_sqfs, ["bind"])):
        text = doctor(user, "--image", str(image))
        r = doctor(user, "--image", str(image), "--json")
        assert r.returncode == text.returncode == 0, r.stderr
        rep = json.loads(r.stdout)
        assert rep["works"] == works
        for mode in ("hybrid", "bind"):
            v = rep["modes"][mode]
            assert v["works"] == (mode in works)
            assert mode_line(text.stdout, mode) == \
                f"{'ok' if v['works'] else 'no':<5} {mode}: {v['reason']}"
        assert rep["launcher"]["kind"] == "mpirun"
        assert rep["launcher"]["implementation"] == "openmpi"
        assert rep["host_mpi"]["soname"] == "libmpi.so.40"
        assert rep["host_mpi"]["family"] == "openmpi"
        assert rep["image"]["kind"] == "squashfs"
        assert [m["soname"] for m in rep["image"]["mpi"]] == (
            ["libmpi.so.40"] if "hybrid" in works else [])
        assert rep["ranks"]["user_namespaces"]["usable"] is True


def test_directory_image(user, host_mpi, openmpi_dir):
    r = doctor(user, "--image", str(openmpi_dir), "--json")
    assert r.returncode == 0, r.stderr
    rep = json.loads(r.stdout)
    assert rep["image"]["kind"] == "sandbox"
    assert rep["image"]["mpi"] == [{"soname": "libmpi.so.40", "family": "openmpi",
                                    "path": "/lib/x86_64-linux-gnu/libmpi.so.40"}]
    assert rep["works"] == ["hybrid", "bind"]


def test_sif_image(user, host_mpi, openmpi_dir, tmp_path_factory):
    """A SIF's ld.so.cache is read at the SquashFS's offset inside the file."""
    d = tmp_path_factory.mktemp("doctor-sif")
    tree = d / "tree"
    (tree / "etc").mkdir(parents=True)
    shutil.copy(openmpi_dir / "etc" / "ld.so.cache", tree / "etc" / "ld.so.cache")
    sif = d / "small.sif"
    subprocess.run(cli_argv("build", str(sif), str(tree)), check=True, capture_output=True)
    for p in (d, *d.parents):
        if str(p).startswith("/tmp/pytest-of-root"):
            os.chmod(p, 0o755)
    sif.chmod(0o644)
    r = doctor(user, "--image", str(sif), "--json")
    assert r.returncode == 0, r.stderr
    rep = json.loads(r.stdout)
    assert rep["image"]["kind"] == "sif"
    assert [m["soname"] for m in rep["image"]["mpi"]] == ["libmpi.so.40"]
    assert rep["modes"]["hybrid"]["works"] is True


def test_family_mismatch_with_mpirun_is_a_warning(user, host_mpi, openmpi_sqfs):
    r = doctor(user, "--image", str(openmpi_sqfs), env={"HPCIMAGE_MPI_LAUNCHER": "mpirun.mpich"})
    assert r.returncode == 0, r.stderr
    launcher = section(r.stdout, "Launcher")
    assert launcher[0].startswith("ok    mpirun.mpich: /usr/bin/mpirun.mpich "
                                  "(HPCIMAGE_MPI_LAUNCHER=mpirun.mpich)")
    assert any(ln.startswith("ok    implementation: mpich") for ln in launcher)
    modes = section(r.stdout, "Modes")
    assert "warn  the image's MPI is openmpi but mpirun is mpich: the ranks may not wire up; " \
        "use the image family's launcher (--launcher, or the host module of that family)" in modes


def test_no_launcher_and_bad_state_dir_mean_no_mode_works(user, host_mpi, openmpi_sqfs, userdir):
    """A state directory that is not the user's makes every rank fail: exit 1."""
    theirs = userdir / f"hpcimage-{user.uid}"
    theirs.mkdir()                      # owned by root
    r = doctor(user, "--image", str(openmpi_sqfs), env={"HPCIMAGE_MPI_STATE": str(userdir)})
    assert r.returncode == 1, r.stdout + r.stderr
    rk = section(r.stdout, "Ranks on a node")
    assert f"no    state directory: {theirs}: owned by uid 0, not you; image-mpi refuses it: " \
        "every rank fails; set HPCIMAGE_MPI_STATE=DIR (a directory of yours) or " \
        "HPCIMAGE_MPI_SHARE=0 (per-rank namespaces)" in rk
    assert mode_line(r.stdout, "hybrid").startswith("no    hybrid: the image's Open MPI")
    assert r.stdout.endswith("result: no MPI mode works here\n")
    # Sharing off does without the state directory.
    r = doctor(user, "--image", str(openmpi_sqfs),
               env={"HPCIMAGE_MPI_STATE": str(userdir), "HPCIMAGE_MPI_SHARE": "0"})
    assert r.returncode == 0, r.stdout
    # No launcher on PATH.
    r = doctor(user, "--image", str(openmpi_sqfs), env={"PATH": "/nonexistent"})
    assert r.returncode == 1
    assert section(r.stdout, "Launcher") == [
        "no    mpirun: not found on PATH (no Slurm allocation: SLURM_JOB_ID unset) "
        "(load the host MPI module?)"]


def test_state_dir_is_not_created(user, host_mpi, openmpi_sqfs, userdir):
    r = doctor(user, "--image", str(openmpi_sqfs), env={"HPCIMAGE_MPI_STATE": str(userdir)})
    assert r.returncode == 0
    assert f"ok    state directory: {userdir}/hpcimage-{user.uid}: created by the first rank" \
        in section(r.stdout, "Ranks on a node")
    assert not (userdir / f"hpcimage-{user.uid}").exists()


@pytest.mark.slurm
def test_inside_allocation_lists_pmi_plugins(user, slurm_cluster, openmpi_sqfs, tmp_path_factory):
    d = tmp_path_factory.mktemp("doctor-site")
    for p in (d, *d.parents):
        if str(p).startswith("/tmp/pytest-of-root"):
            os.chmod(p, 0o755)
    site = d / "site.json"
    site.write_text(json.dumps({"mpi": {"srun_mpi": "pmi2"}}))
    site.chmod(0o644)
    r = doctor(user, "--image", str(openmpi_sqfs),
               env={"SLURM_JOB_ID": "4242", "HPCIMAGE_SITE_CONFIG": str(site)})
    assert r.returncode == 0, r.stdout + r.stderr
    launcher = section(r.stdout, "Launcher")
    assert launcher[0] == "ok    srun: /usr/bin/srun (inside Slurm allocation 4242)"
    plugins = next(ln for ln in launcher if "srun --mpi=list" in ln).split(": ", 1)[1].split()
    assert "pmix" in plugins and "pmi2" in plugins
    assert "info  site mpi.srun_mpi=pmi2: image-mpi passes --mpi=pmi2" in launcher
    # The image's Open MPI wires up through PMIx, not the site's pmi2.
    assert ("warn  the image's Open MPI wires up through pmix; the site's srun_mpi is pmi2"
            in section(r.stdout, "Modes"))
