#!/usr/bin/env bash
# Install the real MPI and Slurm parts the MPI tests and bench/mpi use, from Debian 12's
# own packages, as root. Idempotent: nothing is downloaded when all is there.
#
#   bash scripts/setup-mpi.sh          # install what is missing, fix the MPI defaults
#   bash scripts/setup-mpi.sh --check  # exit 1 (listing them) if packages are missing
#
# What it gives (Debian 12 bookworm):
#   Open MPI 4.1.4   openmpi-bin libopenmpi-dev     mpicc / mpirun / mpiexec (the default)
#   MPICH 4.0.2      mpich libmpich-dev             mpicc.mpich / mpirun.mpich / mpiexec.mpich,
#                                                   /usr/lib/x86_64-linux-gnu/libmpich.so.12
#   mpi4py 3.1.4     python3-mpi4py                 for /usr/bin/python3, built against
#                                                   Debian's Open MPI (the PyPI mpi4py in the
#                                                   venv is left alone)
#   PMIx 4.2.2       libpmix2 libpmix-dev
#   Slurm 22.05.8    slurmctld slurmd slurm-client  the pmix plugin is mpi_pmix_v4.so in
#                    munge                          slurm-wlm-basic-plugins (srun --mpi=pmix)
# Open MPI and MPICH coexist through update-alternatives (groups `mpi` and `mpirun`);
# this script pins both groups to Open MPI so that a plain mpicc/mpirun is Open MPI
# whatever order the packages were installed in. MPICH stays reachable by its own names.
set -euo pipefail

if [ "$(id -u)" != 0 ]; then
    echo "setup-mpi.sh: run as root (it installs Debian packages)" >&2
    exit 2
fi

pkgs=(openmpi-bin libopenmpi-dev mpich libmpich-dev python3-mpi4py libpmix2 libpmix-dev
      munge slurmctld slurmd slurm-client slurm-wlm-basic-plugins gcc make hostname procps)
missing=()
for p in "${pkgs[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p")
done
if [ "${1:-}" = --check ]; then
    if [ ${#missing[@]} -gt 0 ]; then echo "missing: ${missing[*]}"; exit 1; fi
    exit 0
fi
if [ ${#missing[@]} -gt 0 ]; then
    export DEBIAN_FRONTEND=noninteractive
    # No systemd here: keep the packages' maintainer scripts from starting daemons
    # (munge, slurmctld, slurmd are started by scripts/slurm.sh with our own config).
    policy=/usr/sbin/policy-rc.d
    had_policy=0; [ -e "$policy" ] && had_policy=1
    if [ $had_policy = 0 ]; then printf '#!/bin/sh\nexit 101\n' >"$policy"; chmod 755 "$policy"; fi
    rc=0
    { apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null 2>&1; } || {
        apt-get update -q >/dev/null && \
        apt-get install -y -q --no-install-recommends "${missing[@]}"; } || rc=$?
    if [ $had_policy = 0 ]; then rm -f "$policy"; fi
    if [ $rc != 0 ]; then
        echo "setup-mpi.sh: apt-get install ${missing[*]} failed" >&2
        exit 1
    fi
fi

# Open MPI is the default MPI (mpicc, mpirun, mpiexec, libmpi.so, mpi.h).
arch=$(dpkg-architecture -qDEB_HOST_MULTIARCH 2>/dev/null || echo x86_64-linux-gnu)
update-alternatives --set mpi "/usr/bin/mpicc.openmpi" >/dev/null 2>&1 || true
update-alternatives --set mpirun "/usr/bin/mpirun.openmpi" >/dev/null 2>&1 || true
update-alternatives --set "mpi-$arch" "/usr/lib/$arch/openmpi/include" >/dev/null 2>&1 || true

# Open MPI 4.1's mpirun launches 32 or more local processes from 4 threads
# (odls_base_cutoff=32, odls_base_max_threads=4) and then, for processes that exit at once
# (`mpirun -n 32 true`), loses track of them and waits forever about half the time here.
# One launch thread cures it; Debian's file already carries such site workarounds.
mca=/etc/openmpi/openmpi-mca-params.conf
if [ -f "$mca" ] && ! grep -q '^odls_base_max_threads' "$mca"; then
    printf '\n# hpcimage scripts/setup-mpi.sh: mpirun -n >=32 of fast-exiting programs hangs with\n# the threaded launch of Open MPI 4.1 (docs/mpi-setup.md)\nodls_base_max_threads = 0\n' >>"$mca"
fi

fail=0
for f in /usr/bin/mpicc.openmpi /usr/bin/mpirun.openmpi /usr/bin/mpicc.mpich \
         /usr/bin/mpirun.mpich "/usr/lib/$arch/libmpi.so.40" "/usr/lib/$arch/libmpich.so.12" \
         "/usr/lib/$arch/slurm-wlm/mpi_pmix.so"; do
    [ -e "$f" ] || { echo "setup-mpi.sh: $f missing after install" >&2; fail=1; }
done
case "$(readlink -f /usr/bin/mpirun)" in
    *orterun*|*openmpi*) ;;
    *) echo "setup-mpi.sh: mpirun is not Open MPI ($(readlink -f /usr/bin/mpirun))" >&2; fail=1 ;;
esac
exit $fail
