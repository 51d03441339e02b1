#!/usr/bin/env bash
# slurm-local.sh -- a throwaway single-node Slurm cluster for tests (Debian 12, run as root).
#
#   slurm-local.sh install     apt-get install the Debian packages (idempotent; silent on success)
#   slurm-local.sh start DIR   write configs under DIR and start munged, mariadbd, slurmdbd,
#                              slurmctld and slurmd; wait until the node is idle and sacct
#                              answers. Prints "export SLURM_CONF=DIR/slurm.conf" on success.
#   slurm-local.sh stop DIR    cancel the cluster's jobs and stop the daemons started by
#                              "start DIR" (found through DIR/run/*.pid), and only those.
#   slurm-local.sh status DIR  exit 0 if the cluster under DIR answers sinfo.
#
# Every config, state, log, socket and pid file lives under DIR (keep DIR short: unix socket
# paths are limited to ~100 characters). Clients (sbatch, squeue, sacct, submitit) must run
# with SLURM_CONF=DIR/slurm.conf in their environment.
#
# Why MariaDB + slurmdbd: submitit polls job states with plain `sacct` and has no squeue
# fallback; with AccountingStorageType=accounting_storage/none, `sacct` exits 1 ("Slurm
# accounting storage is disabled"), and slurmdbd's only storage backend is MySQL/MariaDB.
#
# Environment knobs: SLURM_LOCAL_START_TIMEOUT (seconds, default 60),
# SLURM_LOCAL_PORT_BASE (first port tried, default 16817; 4 free ports are picked).
# Failures print one line "slurm-local: <reason>" on stderr and exit non-zero.
set -u
set -o pipefail
umask 022

PROG=slurm-local
die() { echo "$PROG: $*" >&2; exit 1; }

START_TIMEOUT=${SLURM_LOCAL_START_TIMEOUT:-60}
PORT_BASE=${SLURM_LOCAL_PORT_BASE:-16817}
PKGS="slurmctld slurmd slurm-client slurmdbd munge mariadb-server-core mariadb-client-core"
BINS="munged slurmctld slurmd slurmdbd sinfo sbatch squeue scancel sacct mariadbd mariadb-install-db mariadb"
# Stop order (start order is the reverse).
DAEMONS="slurmd slurmctld slurmdbd mariadbd munged"

# ---------------------------------------------------------------------------- install
cmd_install() {
    [ "$(id -u)" = 0 ] || die "install needs root"
    command -v apt-get >/dev/null 2>&1 || die "apt-get not found (not Debian/Ubuntu)"
    local missing="" p
    for p in $PKGS; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing="$missing $p"
    done
    [ -z "$missing" ] && return 0
    export DEBIAN_FRONTEND=noninteractive
    local log own_policy=0 ok=1
    log=$(mktemp)
    # Never let package maintainer scripts start the system-wide services.
    if [ ! -e /usr/sbin/policy-rc.d ]; then
        printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d && chmod 755 /usr/sbin/policy-rc.d && own_policy=1
    fi
    # shellcheck disable=SC2086
    if ! timeout 900 apt-get install -y -q --no-install-recommends $missing >"$log" 2>&1; then
        # Fresh images have empty package lists: update once and retry.
        timeout 600 apt-get update -q >>"$log" 2>&1
        timeout 900 apt-get install -y -q --no-install-recommends $missing >>"$log" 2>&1 || ok=0
    fi
    [ "$own_policy" = 1 ] && rm -f /usr/sbin/policy-rc.d
    if [ "$ok" = 0 ]; then
        local last
        last=$(grep -E '^(E|W):' "$log" | tail -n 1)
        rm -f "$log"
        die "apt-get install failed${last:+: $last}"
    fi
    rm -f "$log"
}

# ---------------------------------------------------------------------------- helpers
abs_dir() {
    case "$1" in /*) printf '%s\n' "${1%/}" ;; *) printf '%s\n' "$(pwd)/${1%/}" ;; esac
}

# Is a TCP port used (any state, IPv4 or IPv6)?
port_used() {
    local hex
    hex=$(printf '%04X' "$1")
    cat /proc/net/tcp /proc/net/tcp6 2>/dev/null | awk -v h="$hex" 'NR>1 {split($2,a,":"); if (a[2]==h) f=1} END {exit !f}'
}

port_listening() {
    local hex
    hex=$(printf '%04X' "$1")
    cat /proc/net/tcp /proc/net/tcp6 2>/dev/null | awk -v h="$hex" 'NR>1 && $4=="0A" {split($2,a,":"); if (a[2]==h) f=1} END {exit !f}'
}

pick_port() {  # first unused port >= $1 (callers chain from the previous pick + 1)
    local p=$1
    while [ "$p" -lt 65000 ]; do
        port_used "$p" || { echo "$p"; return 0; }
        p=$((p + 1))
    done
    return 1
}

# Is pid $1 alive (zombies waiting to be reaped count as dead)?
alive() {
    local st
    st=$(sed -n 's/^[0-9]* (.*) \([A-Za-z]\).*/\1/p' "/proc/$1/stat" 2>/dev/null) || return 1
    [ -n "$st" ] && [ "$st" != Z ] && [ "$st" != X ]
}

# pid of daemon $2 of cluster $1, if it is alive and really belongs to DIR $1.
live_pid() {
    local dir=$1 name=$2 pid
    [ -f "$dir/run/$name.pid" ] || return 1
    pid=$(tr -dc '0-9' <"$dir/run/$name.pid")
    [ -n "$pid" ] && alive "$pid" || return 1
    # Guard against pid reuse: the process must mention DIR in its command line or environment.
    cat "/proc/$pid/cmdline" "/proc/$pid/environ" 2>/dev/null | tr '\0' '\n' | grep -qF "$dir" || return 1
    echo "$pid"
}

last_log() {  # last meaningful line of a log file, for error messages
    [ -f "$1" ] || return 0
    grep -v '^[[:space:]]*$' "$1" | grep -vE 'pmix|MPI:|mpi/|not recommended|MailProg' | grep -iE 'error|fatal|fail|denied|cannot|unable' | tail -n 1 | cut -c1-300
}

# ---------------------------------------------------------------------------- start
# spawn DIR NAME CMD...: run a self-daemonizing daemon in its own session, cwd DIR, stdio to
# DIR/log/NAME.out (so no daemon keeps the caller's stdout/stderr pipes open); returns its status.
spawn() {
    local dir=$1 name=$2
    shift 2
    (cd "$dir" && exec setsid -w "$@") </dev/null >>"$dir/log/$name.out" 2>&1
}
# spawn_bg: same for a daemon that stays in the foreground (mariadbd).
spawn_bg() {
    local dir=$1 name=$2
    shift 2
    (cd "$dir" && exec setsid -f "$@") </dev/null >>"$dir/log/$name.out" 2>&1
}

START_DIR=""
fail_start() {
    local msg=$1
    [ -n "$START_DIR" ] && cmd_stop_quiet "$START_DIR"
    die "$msg"
}

deadline_left() { local l=$((DEADLINE - $(date +%s))); [ "$l" -gt 1 ] || l=1; echo "$l"; }  # never 0 (= no limit)

wait_for() {  # wait_for DESC LOGFILE CMD... : poll CMD until success or deadline
    local desc=$1 logf=$2
    shift 2
    while :; do
        "$@" >/dev/null 2>&1 && return 0
        if [ "$(date +%s)" -ge "$DEADLINE" ]; then
            local l
            l=$(last_log "$logf")
            fail_start "$desc not ready within ${START_TIMEOUT}s${l:+ (log: $l)}"
        fi
        sleep 0.5
    done
}

cmd_start() {
    local DIR
    DIR=$(abs_dir "${1:-}")
    [ "$(id -u)" = 0 ] || die "start needs root"
    case "$DIR" in *[[:space:]]*) die "DIR must not contain whitespace: $DIR" ;; esac
    [ ${#DIR} -le 80 ] || die "DIR too long (${#DIR} > 80 chars; unix socket paths would overflow): $DIR"
    local b missing=""
    for b in $BINS; do command -v "$b" >/dev/null 2>&1 || missing="$missing $b"; done
    [ -z "$missing" ] || die "missing binaries:$missing (run: $0 install)"
    for b in $DAEMONS; do
        live_pid "$DIR" "$b" >/dev/null && die "$b already running for $DIR (run: $0 stop $DIR)"
    done
    DEADLINE=$(( $(date +%s) + START_TIMEOUT ))

    mkdir -p "$DIR"/{run,log,state/ctld,state/d,munge,munge-sock,db} || die "cannot create $DIR"
    chmod 755 "$DIR" "$DIR/munge-sock" && chmod 700 "$DIR/munge" "$DIR/db" || die "chmod failed in $DIR"
    START_DIR=$DIR

    local host
    host=$(hostname -s 2>/dev/null || cat /proc/sys/kernel/hostname 2>/dev/null)
    host=${host%%.*}
    [ -n "$host" ] || host=localhost

    local ctld_port slurmd_port dbd_port db_port
    ctld_port=$(pick_port "$PORT_BASE") && slurmd_port=$(pick_port "$((ctld_port + 1))") &&
        dbd_port=$(pick_port "$((slurmd_port + 1))") && db_port=$(pick_port "$((dbd_port + 1))") ||
        fail_start "no free TCP ports from $PORT_BASE"

    # Node hardware exactly as slurmd will detect it.
    local hw
    hw=$(timeout 20 slurmd -C 2>/dev/null | head -n 1 | sed -n 's/^NodeName=[^ ]* //p')
    if ! echo "$hw" | grep -q 'CPUs=.*RealMemory='; then
        hw="CPUs=$(nproc) RealMemory=$(awk '/^MemTotal/ {print int($2/1024)}' /proc/meminfo)"
    fi

    # ---- munge
    local sock="$DIR/munge-sock/munge.socket.2"
    if [ ! -s "$DIR/munge/munge.key" ]; then
        dd if=/dev/urandom of="$DIR/munge/munge.key" bs=1024 count=1 status=none || fail_start "cannot write munge key"
    fi
    chmod 400 "$DIR/munge/munge.key"
    # --force: munged otherwise refuses sockets below a parent that is not o+x (pytest's tmp dirs are 0700).
    spawn "$DIR" munged munged --socket="$sock" --key-file="$DIR/munge/munge.key" --pid-file="$DIR/run/munged.pid" \
        --log-file="$DIR/log/munged.log" --seed-file="$DIR/munge/munged.seed" --num-threads=4 --force ||
        fail_start "munged failed to start: $(tail -n 1 "$DIR/log/munged.out" 2>/dev/null)"
    wait_for munged "$DIR/log/munged.log" test -S "$sock"

    # ---- MariaDB (slurmdbd's only storage backend)
    local dbpass
    if [ ! -s "$DIR/db/pass" ]; then
        od -An -N16 -tx1 /dev/urandom | tr -d ' \n' >"$DIR/db/pass"
    fi
    dbpass=$(cat "$DIR/db/pass")
    local dbsock="$DIR/db/mysqld.sock"
    if [ ! -d "$DIR/db/data/mysql" ]; then
        local rc=0
        (cd "$DIR" && timeout "$(deadline_left)" mariadb-install-db --no-defaults --datadir="$DIR/db/data" --user=root \
            --auth-root-authentication-method=normal --skip-test-db >"$DIR/log/mariadb-install.log" 2>&1) || rc=$?
        if [ "$rc" != 0 ]; then
            cmd_stop_quiet "$DIR"   # also kills its bootstrap mariadbd
            rm -rf "$DIR/db/data"
            [ "$rc" = 124 ] && fail_start "mariadb-install-db did not finish within ${START_TIMEOUT}s"
            fail_start "mariadb-install-db failed (exit $rc): $(last_log "$DIR/log/mariadb-install.log")"
        fi
    fi
    spawn_bg "$DIR" mariadbd mariadbd --no-defaults --user=root --datadir="$DIR/db/data" --socket="$dbsock" \
        --pid-file="$DIR/run/mariadbd.pid" --log-error="$DIR/log/mariadbd.log" \
        --bind-address=127.0.0.1 --port="$db_port" --skip-name-resolve --skip-log-bin \
        --performance-schema=OFF --innodb-buffer-pool-size=32M --innodb-log-file-size=16M \
        --innodb-lock-wait-timeout=900 --max-connections=50
    local sqlc=(timeout 10 mariadb --no-defaults --socket="$dbsock" -uroot)
    wait_for mariadbd "$DIR/log/mariadbd.log" "${sqlc[@]}" -e 'SELECT 1'
    "${sqlc[@]}" -e "CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY '$dbpass';
        ALTER USER 'slurm'@'127.0.0.1' IDENTIFIED BY '$dbpass';
        GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';" >>"$DIR/log/mariadb-setup.log" 2>&1 ||
        fail_start "MariaDB user setup failed: $(tail -n 1 "$DIR/log/mariadb-setup.log")"

    # ---- configs
    cat >"$DIR/slurm.conf" <<EOF
# Generated by slurm-local.sh: single-node test cluster, everything under $DIR
ClusterName=local
SlurmctldHost=$host(127.0.0.1)
SlurmUser=root
SlurmdUser=root
SlurmctldPort=$ctld_port
SlurmdPort=$slurmd_port
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$sock
StateSaveLocation=$DIR/state/ctld
SlurmdSpoolDir=$DIR/state/d
SlurmctldPidFile=$DIR/run/slurmctld.pid
SlurmdPidFile=$DIR/run/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
# No cgroups anywhere: works in containers / VMs without a writable cgroup tree.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
SwitchType=switch/none
MpiDefault=none
# Accounting through slurmdbd so that plain "sacct" (used by submitit) works.
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=127.0.0.1
AccountingStoragePort=$dbd_port
# For slurmdbd, AccountingStoragePass is the munge socket used to talk to it.
AccountingStoragePass=$sock
JobCompType=jobcomp/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
MailProg=/bin/true
KillWait=5
MinJobAge=300
SlurmctldTimeout=30
SlurmdTimeout=60
InactiveLimit=0
NodeName=$host NodeAddr=127.0.0.1 $hw State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP
EOF
    (umask 077 && cat >"$DIR/slurmdbd.conf" <<EOF
# Generated by slurm-local.sh
AuthType=auth/munge
AuthInfo=socket=$sock
DbdHost=localhost
DbdAddr=127.0.0.1
DbdPort=$dbd_port
SlurmUser=root
PidFile=$DIR/run/slurmdbd.pid
LogFile=$DIR/log/slurmdbd.log
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$db_port
StorageUser=slurm
StoragePass=$dbpass
StorageLoc=slurm_acct_db
EOF
    )
    chmod 600 "$DIR/slurmdbd.conf"
    export SLURM_CONF="$DIR/slurm.conf"   # slurmdbd finds slurmdbd.conf next to it

    # ---- slurmdbd
    spawn "$DIR" slurmdbd slurmdbd ||
        fail_start "slurmdbd failed to start: $(last_log "$DIR/log/slurmdbd.log")"
    wait_for slurmdbd "$DIR/log/slurmdbd.log" port_listening "$dbd_port"

    # ---- slurmctld, slurmd
    spawn "$DIR" slurmctld slurmctld -f "$SLURM_CONF" ||
        fail_start "slurmctld failed to start: $(last_log "$DIR/log/slurmctld.log")"
    spawn "$DIR" slurmd slurmd -f "$SLURM_CONF" -N "$host" ||
        fail_start "slurmd failed to start: $(last_log "$DIR/log/slurmd.log")"

    node_idle() { [ "$(timeout 5 sinfo -h -n "$host" -o %T 2>/dev/null)" = idle ]; }
    wait_for "node $host (idle in sinfo)" "$DIR/log/slurmd.log" node_idle
    # The cluster registers itself in slurmdbd when slurmctld connects; wait until sacct answers.
    wait_for "sacct" "$DIR/log/slurmdbd.log" timeout 10 sacct -n -X -o JobID -S now
    echo "export SLURM_CONF=$DIR/slurm.conf"
}

# ---------------------------------------------------------------------------- stop
cmd_stop_quiet() {
    local DIR=$1 name pid pids="" i
    export SLURM_CONF="$DIR/slurm.conf"
    # Cancel this cluster's jobs first, so that slurmd cleans up their processes.
    if live_pid "$DIR" slurmctld >/dev/null && [ -f "$SLURM_CONF" ]; then
        local jobs
        jobs=$(timeout 10 squeue -h -o %A 2>/dev/null | tr '\n' ' ')
        if [ -n "${jobs// /}" ]; then
            # shellcheck disable=SC2086
            timeout 10 scancel $jobs >/dev/null 2>&1
            for i in $(seq 20); do
                [ -z "$(timeout 5 squeue -h -o %A 2>/dev/null)" ] && break
                sleep 0.5
            done
        fi
    fi
    for name in $DAEMONS; do
        pid=$(live_pid "$DIR" "$name") || continue
        kill -TERM "$pid" 2>/dev/null
        for i in $(seq 100); do alive "$pid" || break; sleep 0.1; done
        if alive "$pid"; then kill -KILL "$pid" 2>/dev/null; sleep 0.2; fi
        pids="$pids $pid"
        rm -f "$DIR/run/$name.pid"
    done
    # Leftovers: job step daemons of this cluster (their environment carries DIR/slurm.conf) and
    # a bootstrap mariadbd of an interrupted mariadb-install-db (its command line names DIR/db/data).
    local p
    for p in /proc/[0-9]*; do
        case "$(cat "$p/comm" 2>/dev/null)" in
            slurmstepd)
                tr '\0' '\n' <"$p/environ" 2>/dev/null | grep -qxF "SLURM_CONF=$DIR/slurm.conf" &&
                    kill -KILL "${p#/proc/}" 2>/dev/null ;;
            mariadbd | mysqld)
                tr '\0' '\n' <"$p/cmdline" 2>/dev/null | grep -qxF -- "--datadir=$DIR/db/data" &&
                    kill -KILL "${p#/proc/}" 2>/dev/null ;;
        esac
    done
    return 0
}

cmd_stop() {
    local DIR
    DIR=$(abs_dir "${1:-}")
    cmd_stop_quiet "$DIR"
    local name left=""
    for name in $DAEMONS; do live_pid "$DIR" "$name" >/dev/null && left="$left $name"; done
    [ -z "$left" ] || die "still running:$left"
}

cmd_status() {
    local DIR
    DIR=$(abs_dir "${1:-}")
    SLURM_CONF="$DIR/slurm.conf" timeout 10 sinfo -h >/dev/null 2>&1
}

case "${1:-}" in
    install) cmd_install ;;
    start | stop | status)
        [ -n "${2:-}" ] || die "usage: $0 $1 DIR"
        "cmd_$1" "$2" ;;
    *) echo "usage: $0 {install | start DIR | stop DIR | status DIR}" >&2; exit 2 ;;
esac
