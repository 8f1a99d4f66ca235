#!/usr/bin/env bash
# A multi-node Slurm cluster on this one machine, for image-mpi across nodes (as root).
#
#   bash scripts/slurm-nodes.sh start [N]       # N nodes n1..nN (default 2); idempotent
#   bash scripts/slurm-nodes.sh stop            # daemons, namespaces, state: all gone
#   bash scripts/slurm-nodes.sh status          # exit 0 when every node is up
#   bash scripts/slurm-nodes.sh login [-u USER] CMD...   # CMD on the login side (ctl)
#   bash scripts/slurm-nodes.sh node nI [-u USER] CMD... # CMD on node nI (its network,
#                                                        # hostname, /tmp)
#
# Layout: a controller "ctl" in its own network namespace hpcimage-ctl, which holds a
# bridge (10.251.7.1/24); each node nI in its own network namespace hpcimage-nI (a veth
# on the bridge, 10.251.7.(10+I)), its own hostname (UTS namespace) and its own mount
# namespace with a private tmpfs on /tmp, as separate machines have; one `slurmd -N nI`
# per node (Debian's Slurm is built with multiple-slurmd support). Shared with the host,
# as a cluster shares them: the file system (/home, /opt, /var/tmp, the image store) and
# munged, whose socket is a path. The root network namespace, the host's /tmp and the
# one-node cluster of scripts/slurm.sh are left alone: nothing here listens outside
# these namespaces. The configuration is $STATE/slurm.conf (SLURM_CONF for clients).
#
# Notes: namespaces are entered with nsenter (`ip netns exec` remounts /sys, and slurmd
# then cannot find its cgroup plugin); slurmctld needs SlurmctldHost's name as its own
# hostname. `mpirun` outside Slurm reaches the nodes with scripts/nodes-rsh.py (no ssh).
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
STATE=${HPCIMAGE_NODES_DIR:-/var/tmp/hpcimage-nodes}
NS=hpcimage
NET=10.251.7
CPUS=${HPCIMAGE_NODES_CPUS:-32}
CONF=$STATE/slurm.conf

say() { echo "slurm-nodes.sh: $*"; }
die() { echo "slurm-nodes.sh: error: $*" >&2; exit 1; }
usage() { echo "usage: $0 start [N] | stop | status | login [-u USER] CMD... | node nI [-u USER] CMD..." >&2; exit 2; }

alive() {  # pidfile comm
    local pid
    [ -r "$1" ] && pid=$(cat "$1" 2>/dev/null) && [ -n "$pid" ] \
        && [ "$(cat /proc/$pid/comm 2>/dev/null)" = "$2" ]
}

nodes() { sed -n 's/^NodeName=\(n[0-9]*\) .*/\1/p' "$CONF" 2>/dev/null; }

in_ctl() { nsenter --net=/run/netns/$NS-ctl env SLURM_CONF="$CONF" "$@"; }

conf_text() {  # N
    cat <<CONF
# hpcimage multi-node test cluster: written by scripts/slurm-nodes.sh
ClusterName=hpcimage-nodes
SlurmctldHost=ctl($NET.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
StateSaveLocation=$STATE/ctl
SlurmdSpoolDir=$STATE/spool-%n
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd-%n.pid
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SwitchType=switch/none
MpiDefault=pmix
LaunchParameters=use_interactive_step
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SlurmdParameters=config_overrides
ReturnToService=2
InactiveLimit=0
KillWait=5
MinJobAge=30
Waittime=0
CONF
    local i
    for i in $(seq 1 "$1"); do
        echo "NodeName=n$i NodeAddr=$NET.$((10 + i)) NodeHostname=n$i CPUs=$CPUS State=UNKNOWN"
    done
    echo "PartitionName=nodes Nodes=ALL Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:4"
}

all_up() {  # N
    local up
    up=$(in_ctl sinfo -h -N -o '%N %T' 2>/dev/null | awk '$2 ~ /^(idle|mixed|alloc)/' | wc -l)
    [ "$up" = "$1" ]
}

start() {
    local n=${1:-2} i ns
    case $n in ''|*[!0-9]*|0) die "N must be a number of nodes (1 or more), not '$n'" ;; esac
    [ "$(id -u)" = 0 ] || die "run as root (it makes namespaces and starts slurmctld, slurmd)"
    if [ -f "$CONF" ] && [ "$(nodes | wc -l)" = "$n" ] && alive "$STATE/slurmctld.pid" slurmctld \
        && all_up "$n"; then
        say "already running: $(nodes | tr '\n' ' ')"; return 0
    fi
    stop >/dev/null
    # munged is shared by path; scripts/slurm.sh knows how to start it (and its cluster).
    munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1 || bash "$here/scripts/slurm.sh" start >/dev/null
    install -d -m 0755 "$STATE" "$STATE/log" "$STATE/ctl"
    conf_text "$n" >"$CONF.tmp" && chmod 0644 "$CONF.tmp" && mv "$CONF.tmp" "$CONF"
    install -m 0755 "$here/scripts/nodes-rsh.py" "$STATE/nodes-rsh.py"
    ip netns add $NS-ctl
    ip -n $NS-ctl link set lo up
    ip -n $NS-ctl link add br0 type bridge
    ip -n $NS-ctl addr add $NET.1/24 dev br0
    ip -n $NS-ctl link set br0 up
    for i in $(seq 1 "$n"); do
        ns=$NS-n$i
        ip netns add $ns
        ip -n $ns link set lo up
        ip -n $NS-ctl link add v$i type veth peer name eth0 netns $ns
        ip -n $NS-ctl link set v$i master br0 up
        ip -n $ns addr add $NET.$((10 + i))/24 dev eth0
        ip -n $ns link set eth0 up
        install -d -m 0755 "$STATE/spool-n$i"
    done
    nsenter --net=/run/netns/$NS-ctl unshare --uts sh -c \
        "hostname ctl && exec slurmctld -f '$CONF'" </dev/null >/dev/null 2>&1 \
        || die "slurmctld did not start (see $STATE/log/slurmctld.log)"
    for i in $(seq 1 "$n"); do
        # A node: its network, its hostname, its own /tmp; the rsh server, then slurmd.
        nsenter --net=/run/netns/$NS-n$i unshare --uts --mount --propagation private sh -c "
            hostname n$i && mount -t tmpfs -o mode=1777 tmpfs /tmp || exit 1
            setsid /usr/bin/python3 '$STATE/nodes-rsh.py' --serve '$STATE/n$i.sock' \
                </dev/null >'$STATE/log/rsh-n$i.log' 2>&1 &
            echo \$! >'$STATE/rsh-n$i.pid'
            exec slurmd -f '$CONF' -N n$i" </dev/null >/dev/null 2>&1 \
            || die "slurmd -N n$i did not start (see $STATE/log/slurmd-n$i.log)"
    done
    for i in $(seq 150); do all_up "$n" && break; sleep 0.2; done
    all_up "$n" || { tail -n 20 "$STATE"/log/*.log >&2; die "the nodes are not up after 30 s"; }
    say "running: $n nodes ($(nodes | tr '\n' ' ')), SLURM_CONF=$CONF"
}

stop() {
    [ "$(id -u)" = 0 ] || die "run as root"
    local f pid i
    for f in "$STATE"/slurmd-n*.pid "$STATE"/rsh-n*.pid "$STATE"/slurmctld.pid; do
        [ -f "$f" ] || continue
        pid=$(cat "$f" 2>/dev/null || true)
        [ -n "$pid" ] && kill -TERM "$pid" 2>/dev/null || true
    done
    for i in $(seq 50); do
        pgrep -f "^slurm(ctld|d) -f $CONF" >/dev/null || break
        sleep 0.1
    done
    pkill -KILL -f "^slurm(ctld|d) -f $CONF" 2>/dev/null || true
    # Whatever is left in a node's namespaces (steps of a job) goes with them.
    for ns in $(ip netns list 2>/dev/null | awk -v p="^$NS-" '$1 ~ p {print $1}'); do
        for pid in $(ip netns pids "$ns" 2>/dev/null); do kill -KILL "$pid" 2>/dev/null || true; done
        ip netns del "$ns"
    done
    rm -rf "$STATE/ctl" "$STATE"/spool-* "$STATE"/*.pid "$STATE"/*.sock
    say "stopped"
}

status() {
    [ -f "$CONF" ] || { say "not running (no $CONF)"; return 1; }
    in_ctl sinfo -N -o '%N %T %c' || return 1
    all_up "$(nodes | wc -l)"
}

run_as() {  # [-u USER] CMD...: argv for running CMD as USER (default: the caller)
    if [ "${1:-}" = -u ]; then
        [ $# -ge 3 ] || usage
        local u=$2; shift 2
        exec_argv=(runuser -u "$u" -- env SLURM_CONF="$CONF" "$@")
    else
        [ $# -ge 1 ] || usage
        exec_argv=(env SLURM_CONF="$CONF" "$@")
    fi
}

case "${1:-}" in
    start) shift; start "$@" ;;
    stop) stop ;;
    status) status ;;
    login)
        shift; run_as "$@"
        exec nsenter --net=/run/netns/$NS-ctl "${exec_argv[@]}" ;;
    node)
        shift; [ $# -ge 2 ] || usage
        node=$1; shift
        alive "$STATE/slurmd-$node.pid" slurmd || die "node $node is not running"
        run_as "$@"
        exec nsenter -t "$(cat "$STATE/slurmd-$node.pid")" --net --uts --mount "${exec_argv[@]}" ;;
    *) usage ;;
esac
