#!/usr/bin/env bash
# A one-node Slurm cluster on this host, for the MPI tests and bench/mpi, as root.
#
#   bash scripts/slurm.sh start     # install what is missing, configure, start; idempotent
#   bash scripts/slurm.sh status    # exit 0 when munge, slurmctld, slurmd answer and the node is up
#   bash scripts/slurm.sh stop      # stop slurmd, slurmctld, munged (those our pid files name)
#   bash scripts/slurm.sh restart
#   bash scripts/slurm.sh conf      # print the slurm.conf that `start` writes
#
# Debian 12's packages (scripts/setup-mpi.sh installs them): munge, slurmctld, slurmd,
# slurm-client, slurm-wlm-basic-plugins (holds mpi_pmix.so -> mpi_pmix_v4.so, so
# MpiDefault=pmix). There is no systemd here: the daemons are started directly, each with
# a pid file under /run and a log under /var/log/{munge,slurm}. The one node is this host
# (`hostname -s`, NodeAddr 127.0.0.1) with HPCIMAGE_SLURM_CPUS CPUs (default 64, whatever
# nproc says: SlurmdParameters=config_overrides) so that `srun -n 64` fits on a 2-core box;
# no cgroups (proctrack/linuxproc, task/none).
#
# /etc/slurm/slurm.conf is written only when absent or written by this script before (its
# first line is the marker below); a site's own slurm.conf is never overwritten.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)

CONF=/etc/slurm/slurm.conf
MARK="# hpcimage test cluster: written by scripts/slurm.sh (do not edit; rewritten on start)"
NODE=$(hostname -s)
CPUS=${HPCIMAGE_SLURM_CPUS:-64}
MUNGE_PID=/run/munge/munged.pid
CTLD_PID=/run/slurmctld.pid
SLURMD_PID=/run/slurmd.pid
LOGDIR=/var/log/slurm
TIMEOUT=${HPCIMAGE_SLURM_TIMEOUT:-60}
case $CPUS in ''|*[!0-9]*) echo "slurm.sh: error: HPCIMAGE_SLURM_CPUS='$CPUS' is not a number" >&2; exit 2 ;; esac

say() { echo "slurm.sh: $*"; }
die() { echo "slurm.sh: error: $*" >&2; exit 1; }

conf_text() {
    local slurm_user=root
    id slurm >/dev/null 2>&1 && slurm_user=slurm
    cat <<EOF
$MARK
ClusterName=hpcimage
SlurmctldHost=$NODE(127.0.0.1)
SlurmUser=$slurm_user
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
SlurmctldPort=6817
SlurmdPort=6818
StateSaveLocation=/var/lib/slurm/slurmctld
SlurmdSpoolDir=/var/lib/slurm/slurmd
SlurmctldPidFile=$CTLD_PID
SlurmdPidFile=$SLURMD_PID
SlurmctldLogFile=$LOGDIR/slurmctld.log
SlurmdLogFile=$LOGDIR/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
# No cgroups on these machines (PID 1 is not systemd).
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SwitchType=switch/none
MpiDefault=pmix
LaunchParameters=use_interactive_step
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SlurmdParameters=config_overrides
ReturnToService=2
SlurmdTimeout=300
InactiveLimit=0
KillWait=5
MinJobAge=60
Waittime=0
NodeName=$NODE NodeAddr=127.0.0.1 NodeHostname=$NODE CPUs=$CPUS State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:4
EOF
}

pid_alive() {  # pidfile comm
    local f=$1 comm=$2 pid
    [ -r "$f" ] || return 1
    pid=$(cat "$f" 2>/dev/null) || return 1
    [ -n "$pid" ] && [ -r "/proc/$pid/comm" ] || return 1
    [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "$comm" ]
}

stop_one() {  # pidfile comm
    local f=$1 comm=$2 pid i
    pid_alive "$f" "$comm" || { rm -f "$f"; return 0; }
    pid=$(cat "$f")
    kill -TERM "$pid" 2>/dev/null || true
    for i in $(seq 50); do
        [ -d "/proc/$pid" ] || break
        sleep 0.1
    done
    if [ -d "/proc/$pid" ]; then kill -KILL "$pid" 2>/dev/null || true; sleep 0.2; fi
    rm -f "$f"
}

munge_ok() { munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1; }

node_state() { sinfo -h -N -n "$NODE" -o %T 2>/dev/null | head -1; }

node_up() {
    case "$(node_state)" in idle*|mixed*|alloc*|allocated*|completing*) return 0 ;; esac
    return 1
}

log_tails() {
    for f in /var/log/munge/munged.log $LOGDIR/slurmctld.log $LOGDIR/slurmd.log; do
        [ -r "$f" ] && { echo "--- tail $f"; tail -n 15 "$f"; }
    done >&2
}

cmd_status() {
    local ok=0
    if pid_alive $MUNGE_PID munged && munge_ok; then say "munged: running ($(cat $MUNGE_PID))"
    else say "munged: not running"; ok=1; fi
    if pid_alive $CTLD_PID slurmctld; then say "slurmctld: running ($(cat $CTLD_PID))"
    else say "slurmctld: not running"; ok=1; fi
    if pid_alive $SLURMD_PID slurmd; then say "slurmd: running ($(cat $SLURMD_PID))"
    else say "slurmd: not running"; ok=1; fi
    if [ $ok = 0 ]; then
        say "node $NODE: $(node_state || true)"
        node_up || ok=1
        say "mpi plugins: $(srun --mpi=list 2>&1 | tr -s ' \t\n' ' ')"
    fi
    return $ok
}

cmd_stop() {
    stop_one $SLURMD_PID slurmd
    stop_one $CTLD_PID slurmctld
    stop_one $MUNGE_PID munged
    say "stopped"
}

start_munge() {
    if pid_alive $MUNGE_PID munged && munge_ok; then return 0; fi
    stop_one $MUNGE_PID munged
    if [ ! -s /etc/munge/munge.key ]; then
        mungekey --create --keyfile=/etc/munge/munge.key 2>/dev/null \
            || dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 status=none
    fi
    chown munge:munge /etc/munge /etc/munge/munge.key
    chmod 0700 /etc/munge; chmod 0600 /etc/munge/munge.key
    install -d -o munge -g munge -m 0755 /run/munge
    install -d -o munge -g munge -m 0700 /var/log/munge /var/lib/munge
    runuser -u munge -- /usr/sbin/munged </dev/null >/dev/null 2>&1 \
        || { log_tails; die "munged did not start"; }
    local i
    for i in $(seq 50); do munge_ok && return 0; sleep 0.1; done
    log_tails; die "munge does not answer (munge -n | unmunge fails)"
}

start() {
    [ "$(id -u)" = 0 ] || die "run as root (it starts munged, slurmctld and slurmd)"
    if ! bash "$here/scripts/setup-mpi.sh" --check >/dev/null 2>&1; then
        say "installing Slurm, munge and MPI from Debian's packages (scripts/setup-mpi.sh)"
        bash "$here/scripts/setup-mpi.sh" || die "scripts/setup-mpi.sh failed"
    fi
    # The configuration.
    local want changed=0
    want=$(conf_text)
    if [ -e "$CONF" ] && [ "$(head -n1 "$CONF")" != "$MARK" ]; then
        die "$CONF exists and was not written by scripts/slurm.sh; not touching a site's Slurm"
    fi
    if [ ! -e "$CONF" ] || [ "$(cat "$CONF")" != "$want" ]; then
        mkdir -p /etc/slurm
        printf '%s\n' "$want" >"$CONF.tmp"
        chmod 0644 "$CONF.tmp"
        mv "$CONF.tmp" "$CONF"
        changed=1
    fi
    # Fast path: everything up with this configuration.
    if [ $changed = 0 ] && pid_alive $MUNGE_PID munged && pid_alive $CTLD_PID slurmctld \
        && pid_alive $SLURMD_PID slurmd && munge_ok && node_up; then
        say "already running (node $NODE $(node_state))"
        return 0
    fi
    start_munge
    local su; su=$(sed -n 's/^SlurmUser=//p' "$CONF")
    install -d -o "$su" -g "$su" -m 0755 /var/lib/slurm /var/lib/slurm/slurmctld $LOGDIR
    install -d -m 0755 /var/lib/slurm/slurmd
    if [ $changed = 1 ]; then
        stop_one $SLURMD_PID slurmd
        stop_one $CTLD_PID slurmctld
    fi
    if ! pid_alive $CTLD_PID slurmctld; then
        rm -f $CTLD_PID
        slurmctld </dev/null >/dev/null 2>&1 || { log_tails; die "slurmctld did not start"; }
    fi
    local i
    for i in $(seq $((TIMEOUT * 5))); do
        scontrol ping 2>/dev/null | grep -q UP && break
        pid_alive $CTLD_PID slurmctld || { sleep 0.2; pid_alive $CTLD_PID slurmctld \
            || { log_tails; die "slurmctld exited (see $LOGDIR/slurmctld.log)"; }; }
        sleep 0.2
    done
    scontrol ping 2>/dev/null | grep -q UP || { log_tails; die "slurmctld does not answer"; }
    if ! pid_alive $SLURMD_PID slurmd; then
        rm -f $SLURMD_PID
        slurmd -N "$NODE" </dev/null >/dev/null 2>&1 || { log_tails; die "slurmd did not start"; }
    fi
    local resumed=0
    for i in $(seq $((TIMEOUT * 5))); do
        node_up && break
        pid_alive $SLURMD_PID slurmd || { sleep 0.2; pid_alive $SLURMD_PID slurmd \
            || { log_tails; die "slurmd exited (see $LOGDIR/slurmd.log)"; }; }
        case "$(node_state)" in
            down*|drain*|fail*)
                if [ $resumed = 0 ] && [ "$i" -gt 10 ]; then
                    scontrol update NodeName="$NODE" State=RESUME >/dev/null 2>&1 || true
                    resumed=1
                fi ;;
        esac
        sleep 0.2
    done
    node_up || { log_tails; die "node $NODE is '$(node_state)', not idle, after ${TIMEOUT}s"; }
    say "running: node $NODE $(node_state), $CPUS CPUs, $(srun --mpi=list 2>&1 | tr -s ' \t\n' ' ')"
}

case "${1:-}" in
    start) start ;;
    stop) [ "$(id -u)" = 0 ] || die "run as root"; cmd_stop ;;
    restart) [ "$(id -u)" = 0 ] || die "run as root"; cmd_stop; start ;;
    status) cmd_status ;;
    conf) conf_text ;;
    *) echo "usage: $0 start|stop|restart|status|conf" >&2; exit 2 ;;
esac
