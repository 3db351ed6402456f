#!/usr/bin/env bash
# A throwaway, single-host, real Slurm cluster with 3 fake nodes (n1, n2, n3),
# for tests and local development. Each node declares 2 GPUs (GRES) whose device
# files are placeholders: steps that ask for GPUs are scheduled and get
# CUDA_VISIBLE_DEVICES, but nothing can compute on them.
#
# Usage: scripts/slurm-test-cluster.sh start|stop|status|env|pmix|gres [DIR]
#   DIR defaults to ${ORCH_SLURM_DIR:-/tmp/orch-slurm-test}.
#
#   start   install Slurm + munge if missing (root + apt-get only; exit 77 when
#           that is impossible), then start munged, slurmctld and one slurmd
#           per node, all owned by DIR, and wait until every node is idle.
#           Idempotent: does nothing when this DIR's cluster already answers.
#   stop    cancel this cluster's jobs, then stop the daemons that DIR's pid
#           files name (and only those).
#   status  print daemon and node state; exit 0 when the cluster answers.
#   env     print the exports clients need:
#             eval "$(scripts/slurm-test-cluster.sh env)"
#   pmix    exit 0 when srun --mpi=pmix spans the nodes (a cluster started
#           before per-node PMIx dirs existed needs a stop and start)
#   gres    exit 0 when every node declares its GPUs (gpu:2 each, placeholder
#           devices: steps asking for GPUs are scheduled, nothing computes;
#           a cluster started before GRES existed needs a stop and start)
#
# Everything lives under DIR: munge key, munge socket, slurm.conf, gres.conf and
# the placeholder GPUs (gpu/<node>/nvidia0..), state,
# spool, logs and pid files. Ports are private (16817 for slurmctld,
# 16818..16820 for the slurmds), so an existing Slurm or munge on the host is
# left alone.
set -euo pipefail

readonly CLUSTER_NAME=orchtest
readonly NODES=(n1 n2 n3)
readonly NODE_CPUS=8
readonly NODE_MEM=4000
# Every node declares GPUs (GRES) so steps that ask for them are scheduled for real;
# the device files are placeholders under DIR/gpu/<node>/ (nothing can compute on them).
readonly NODE_GPUS=2
readonly CTLD_PORT=${ORCH_SLURM_CTLD_PORT:-16817}
readonly SLURMD_PORT_BASE=${ORCH_SLURM_SLURMD_PORT_BASE:-16818}
readonly START_TIMEOUT_S=${ORCH_SLURM_START_TIMEOUT:-30}

die() { echo "slurm-test-cluster: $*" >&2; exit 1; }
log() { echo "slurm-test-cluster: $*" >&2; }

usage() {
    echo "usage: $0 start|stop|status|env|pmix|gres [DIR]" >&2
    exit 2
}

[[ $# -ge 1 && $# -le 2 ]] || usage
CMD=$1
DIR=${2:-${ORCH_SLURM_DIR:-/tmp/orch-slurm-test}}
case "$DIR" in /*) ;; *) DIR="$(pwd)/$DIR" ;; esac
DIR=${DIR%/}
readonly CMD DIR
readonly CONF="$DIR/slurm.conf"
readonly MUNGE_DIR="$DIR/munge"
readonly MUNGE_SOCKET="$MUNGE_DIR/munge.socket"
readonly MUNGE_PID="$MUNGE_DIR/munged.pid"
readonly CTLD_PID="$DIR/run/slurmctld.pid"
# srun --mpi=pmix (Open MPI) across fake nodes: every slurmd puts its PMIx
# client files under the same path, so each runs in its own mount namespace
# where PMIX_DIR is a bind mount of its own PMIX_DIR-<node>.
readonly PMIX_DIR="$DIR/pmix"
readonly PMIX_MARK="$DIR/run/pmix-per-node"

slurmd_pid_file() { echo "$DIR/run/slurmd-$1.pid"; }

# ---------------------------------------------------------------- helpers

# Print the pid recorded in file $1 if that process is alive and its command
# line mentions DIR (guards against a recycled pid). Returns 1 otherwise.
live_pid() {
    local file=$1 pid
    [[ -s $file ]] || return 1
    pid=$(tr -dc '0-9' <"$file")
    [[ -n $pid ]] || return 1
    [[ -r /proc/$pid/cmdline ]] || return 1
    tr '\0' ' ' <"/proc/$pid/cmdline" | grep -qF -- "$DIR/" || return 1
    echo "$pid"
}

# True while pid $1 exists and is not a zombie (pid 1 here may reap late).
pid_running() {
    local state
    state=$(sed 's/.*) //' "/proc/$1/stat" 2>/dev/null | cut -d' ' -f1) || return 1
    [[ -n $state && $state != Z && $state != X ]]
}

all_pid_files() {
    local n
    for n in "${NODES[@]}"; do slurmd_pid_file "$n"; done
    echo "$CTLD_PID"
    echo "$MUNGE_PID"
}

daemons_alive() {
    local f
    for f in $(all_pid_files); do
        live_pid "$f" >/dev/null || return 1
    done
}

# Node states as "name state" lines, via this cluster's config.
node_states() {
    SLURM_CONF=$CONF timeout 10 sinfo -h -N -o '%N %T' 2>/dev/null | sort -u
}

# True when all nodes answer: idle, or busy with work (mixed/allocated).
nodes_up() {
    local states want=${1:-any} line name state count=0
    states=$(node_states) || return 1
    while read -r name state; do
        [[ -n $name ]] || continue
        case "$state" in
            idle) ;;
            mixed | allocated | completing)
                [[ $want == any ]] || return 1 ;;
            *) return 1 ;;
        esac
        count=$((count + 1))
    done <<<"$states"
    [[ $count -eq ${#NODES[@]} ]]
}

tail_logs() {
    local f
    for f in "$MUNGE_DIR/munged.log" "$DIR"/log/*.log; do
        [[ -f $f ]] || continue
        echo "----- tail $f" >&2
        tail -n 20 "$f" >&2
    done
}

# ---------------------------------------------------------------- install

have_binaries() {
    command -v slurmctld >/dev/null && command -v slurmd >/dev/null &&
        command -v munged >/dev/null && command -v sinfo >/dev/null &&
        command -v srun >/dev/null
}

install_packages() {
    have_binaries && return 0
    if [[ $(id -u) -ne 0 ]] || ! command -v apt-get >/dev/null; then
        echo "slurm-test-cluster: slurmctld/slurmd/munged not installed and" \
            "cannot install them (need root and apt-get)" >&2
        exit 77
    fi
    local pkgs=(slurmctld slurmd slurm-client munge libpmix-dev)
    log "installing ${pkgs[*]}"
    export DEBIAN_FRONTEND=noninteractive
    local aptopts=(-y -q -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold
        --no-install-recommends)
    if ! apt-get install "${aptopts[@]}" "${pkgs[@]}" >"$DIR/apt.log" 2>&1; then
        log "apt-get install failed, running apt-get update first"
        apt-get update -q >>"$DIR/apt.log" 2>&1 || true
        apt-get install "${aptopts[@]}" "${pkgs[@]}" >>"$DIR/apt.log" 2>&1 ||
            { tail -n 20 "$DIR/apt.log" >&2; die "apt-get install ${pkgs[*]} failed"; }
    fi
    have_binaries || die "installed ${pkgs[*]} but the daemons are still missing"
}

# ---------------------------------------------------------------- config

write_conf() {
    local host i n
    host=$(hostname -s)
    {
        cat <<EOF
# Generated by scripts/slurm-test-cluster.sh; throwaway test cluster.
ClusterName=$CLUSTER_NAME
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$CTLD_PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket=$MUNGE_SOCKET
CredType=cred/munge
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool/slurmd-%n
SlurmctldPidFile=$CTLD_PID
SlurmdPidFile=$DIR/run/slurmd-%n.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
TmpFS=$DIR/tmp
# No cgroups on this kind of machine.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SwitchType=switch/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SlurmdParameters=config_overrides
SchedulerType=sched/backfill
SchedulerParameters=batch_sched_delay=0
ReturnToService=2
# Make killed steps and jobs go away quickly.
KillWait=2
InactiveLimit=10
SlurmdTimeout=30
SlurmctldTimeout=30
MessageTimeout=10
MinJobAge=60
MailProg=/bin/true
GresTypes=gpu
EOF
        i=0
        for n in "${NODES[@]}"; do
            echo "NodeName=$n NodeHostname=$host NodeAddr=127.0.0.1" \
                "Port=$((SLURMD_PORT_BASE + i)) CPUs=$NODE_CPUS RealMemory=$NODE_MEM" \
                "Gres=gpu:$NODE_GPUS State=UNKNOWN"
            i=$((i + 1))
        done
        echo "PartitionName=debug Nodes=$(IFS=,; echo "${NODES[*]}") Default=YES MaxTime=INFINITE State=UP"
    } >"$CONF.tmp"
    if can_unshare; then
        # Open MPI names its shared-memory segments after the host, which all fake nodes
        # share: ranks of two nodes would map each other's. Each node's own dir keeps them apart.
        # The fake nodes also claim more CPUs than the host has, which Open MPI cannot see
        # under srun: its ranks must yield when idle, as mpirun --oversubscribe makes them.
        echo "TaskProlog=$DIR/task-prolog.sh" >>"$CONF.tmp"
        printf '#!/bin/sh\necho "export OMPI_MCA_btl_vader_backing_directory=%s"\n%s\n' "$PMIX_DIR" \
            'echo "export OMPI_MCA_mpi_yield_when_idle=1"' >"$DIR/task-prolog.sh"
        chmod 0755 "$DIR/task-prolog.sh"
    fi
    write_gres_conf
    mv -f "$CONF.tmp" "$CONF"
    echo "PMIxCliTmpDirBase=$PMIX_DIR" >"$DIR/mpi.conf"
}

# A character device that slurmd accepts as a GPU's File: a node like /dev/null
# (mknod c 1 3), or where mknod is refused, a link to /dev/null.
placeholder_device() {
    [[ -c $1 ]] && return 0
    rm -f "$1"
    mknod "$1" c 1 3 2>/dev/null || ln -s /dev/null "$1"
}

# gres.conf (read from slurm.conf's directory): each node's GPUs are placeholder files
# DIR/gpu/<node>/nvidia0.., so the fake nodes on one host have distinct devices.
write_gres_conf() {
    local n g last=$((NODE_GPUS - 1))
    {
        echo "# Generated by scripts/slurm-test-cluster.sh: placeholder GPUs, nothing computes on them."
        echo "AutoDetect=off"
        for n in "${NODES[@]}"; do
            mkdir -p "$DIR/gpu/$n"
            for ((g = 0; g < NODE_GPUS; g++)); do placeholder_device "$DIR/gpu/$n/nvidia$g"; done
            echo "NodeName=$n Name=gpu File=$DIR/gpu/$n/nvidia[0-$last]"
        done
    } >"$DIR/gres.conf.tmp"
    mv -f "$DIR/gres.conf.tmp" "$DIR/gres.conf"
}

make_dirs() {
    local n
    mkdir -p "$DIR" "$DIR/state" "$DIR/run" "$DIR/log" "$DIR/tmp" "$MUNGE_DIR"
    chmod 0755 "$DIR" "$DIR/run" "$DIR/log"
    chmod 0755 "$MUNGE_DIR"
    for n in "${NODES[@]}"; do mkdir -p "$DIR/spool/slurmd-$n" "$PMIX_DIR-$n"; done
    mkdir -p "$PMIX_DIR"
}

# ---------------------------------------------------------------- daemons

start_munged() {
    live_pid "$MUNGE_PID" >/dev/null && return 0
    local key="$MUNGE_DIR/munge.key"
    if [[ ! -s $key ]]; then
        dd if=/dev/urandom of="$key.tmp" bs=1024 count=1 status=none
        chmod 0400 "$key.tmp"
        mv -f "$key.tmp" "$key"
    fi
    rm -f "$MUNGE_SOCKET" "$MUNGE_SOCKET.lock"
    munged --force \
        --socket="$MUNGE_SOCKET" \
        --key-file="$key" \
        --pid-file="$MUNGE_PID" \
        --log-file="$MUNGE_DIR/munged.log" \
        --seed-file="$MUNGE_DIR/munged.seed" 9>&- ||
        { tail_logs; die "munged failed to start"; }
    local i
    for ((i = 0; i < 50; i++)); do
        [[ -S $MUNGE_SOCKET ]] && live_pid "$MUNGE_PID" >/dev/null && return 0
        sleep 0.1
    done
    tail_logs
    die "munged did not come up (socket $MUNGE_SOCKET)"
}

start_slurmctld() {
    live_pid "$CTLD_PID" >/dev/null && return 0
    SLURM_CONF=$CONF slurmctld -i -f "$CONF" 9>&- ||
        { tail_logs; die "slurmctld failed to start"; }
}

# True when this host lets us give each slurmd a private mount namespace.
can_unshare() {
    unshare --mount --propagation private true 2>/dev/null
}

start_slurmds() {
    local n private=0
    can_unshare && private=1
    for n in "${NODES[@]}"; do
        live_pid "$(slurmd_pid_file "$n")" >/dev/null && continue
        if ((private)); then
            # shellcheck disable=SC2016
            SLURM_CONF=$CONF unshare --mount --propagation private sh -c \
                'mount --bind "$1" "$2" && shift 2 && exec "$@"' _ "$PMIX_DIR-$n" "$PMIX_DIR" \
                slurmd -f "$CONF" -N "$n" 9>&- ||
                { tail_logs; die "slurmd -N $n failed to start"; }
        else
            SLURM_CONF=$CONF slurmd -f "$CONF" -N "$n" 9>&- ||
                { tail_logs; die "slurmd -N $n failed to start"; }
        fi
    done
    if ((private)); then touch "$PMIX_MARK"; else
        rm -f "$PMIX_MARK"
        log "no private mount namespaces here: srun --mpi=pmix works only on one node"
    fi
}

wait_idle() {
    local deadline=$((SECONDS + START_TIMEOUT_S)) resumed=0
    while ((SECONDS < deadline)); do
        if nodes_up idle; then return 0; fi
        # A node left down/drained from an earlier run: put it back once.
        if ((resumed == 0)) && node_states | grep -qE ' (down|drained|draining)'; then
            SLURM_CONF=$CONF scontrol update NodeName="$(IFS=,; echo "${NODES[*]}")" \
                State=RESUME >/dev/null 2>&1 || true
            resumed=1
        fi
        sleep 0.2
    done
    echo "slurm-test-cluster: nodes not idle after ${START_TIMEOUT_S}s:" >&2
    node_states >&2 || true
    tail_logs
    exit 1
}

stop_pid_file() {
    local file=$1 pid i
    pid=$(live_pid "$file") || { rm -f "$file"; return 0; }
    kill -TERM "$pid" 2>/dev/null || true
    for ((i = 0; i < 100; i++)); do
        pid_running "$pid" || { rm -f "$file"; return 0; }
        sleep 0.1
    done
    log "pid $pid ($file) ignored SIGTERM for 10s, sending SIGKILL"
    kill -KILL "$pid" 2>/dev/null || true
    for ((i = 0; i < 50; i++)); do
        pid_running "$pid" || break
        sleep 0.1
    done
    rm -f "$file"
}

cancel_jobs() {
    live_pid "$CTLD_PID" >/dev/null || return 0
    SLURM_CONF=$CONF timeout 10 scancel --cluster="$CLUSTER_NAME" --user=root \
        >/dev/null 2>&1 || SLURM_CONF=$CONF timeout 10 scancel --user="$(id -un)" \
        >/dev/null 2>&1 || true
    local i
    for ((i = 0; i < 50; i++)); do
        [[ -z $(SLURM_CONF=$CONF timeout 10 squeue -h -o %i 2>/dev/null) ]] && return 0
        sleep 0.2
    done
    log "jobs still listed after scancel; stopping daemons anyway"
}

# ---------------------------------------------------------------- commands

with_lock() {
    mkdir -p "$DIR"
    exec 9>"$DIR/.lock"
    flock -w 120 9 || die "could not lock $DIR/.lock"
}

cluster_answers() {
    [[ -f $CONF ]] && daemons_alive && nodes_up any
}

cmd_start() {
    if cluster_answers; then
        cmd_gres || log "this running cluster predates GRES (no GPUs declared): stop and start it to get them"
        return 0
    fi
    if [[ $(id -u) -ne 0 ]]; then
        have_binaries || install_packages # exits 77 with its reason
        echo "slurm-test-cluster: starting slurmctld/slurmd needs root" \
            "(running as uid $(id -u))" >&2
        exit 77
    fi
    with_lock
    cluster_answers && return 0
    install_packages
    make_dirs
    # Rewrite the config only for a fresh start, so running daemons and the
    # file agree.
    if ! live_pid "$CTLD_PID" >/dev/null; then write_conf; fi
    [[ -f $CONF ]] || write_conf
    start_munged
    start_slurmctld
    start_slurmds
    wait_idle
    log "cluster $CLUSTER_NAME up in $DIR (SLURM_CONF=$CONF)"
}

cmd_stop() {
    [[ -d $DIR ]] || return 0
    with_lock
    cancel_jobs
    local n
    for n in "${NODES[@]}"; do stop_pid_file "$(slurmd_pid_file "$n")"; done
    stop_pid_file "$CTLD_PID"
    stop_pid_file "$MUNGE_PID"
}

cmd_status() {
    local f pid rc=0
    for f in $(all_pid_files); do
        if pid=$(live_pid "$f"); then
            echo "$(basename "$f" .pid): running (pid $pid)"
        else
            echo "$(basename "$f" .pid): stopped"
            rc=1
        fi
    done
    if [[ -f $CONF ]] && node_states; then :; else
        echo "sinfo: no answer"
        rc=1
    fi
    return "$rc"
}

cmd_env() {
    printf 'export SLURM_CONF=%q\n' "$CONF"
}

# Exit 0 when srun --mpi=pmix can span the fake nodes (each slurmd has its own PMIx dir).
cmd_pmix() {
    [[ -f $PMIX_MARK ]] && cluster_answers
}

# Exit 0 when every node of this cluster declares NODE_GPUS GPUs (GRES).
cmd_gres() {
    cluster_answers || return 1
    local gres
    gres=$(SLURM_CONF=$CONF timeout 10 sinfo -h -N -o '%N %G' 2>/dev/null | sort -u) || return 1
    [[ $(grep -c " gpu:$NODE_GPUS\b" <<<"$gres") -eq ${#NODES[@]} ]]
}

case "$CMD" in
    start) cmd_start ;;
    stop) cmd_stop ;;
    status) cmd_status ;;
    env) cmd_env ;;
    pmix) cmd_pmix ;;
    gres) cmd_gres ;;
    *) usage ;;
esac
