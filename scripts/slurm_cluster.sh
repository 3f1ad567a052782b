#!/usr/bin/env bash
# A single-node SLURM cluster on loopback, with real accounting, for testing tda-bench's
# SLURM launcher (tests marked `slurm`).
#
#   scripts/slurm_cluster.sh up       start munged, mariadbd, slurmdbd, slurmctld, slurmd
#   scripts/slurm_cluster.sh down     cancel all jobs, stop the daemons it started, by PID
#   scripts/slurm_cluster.sh status   say whether it is up (exit 0) or not (exit 1)
#   scripts/slurm_cluster.sh env      print the `export SLURM_CONF=...` line
#
# Needs root and Debian's packages (scripts/slurm_cluster.sh install, or see .ci/slurm-up.sh):
#   slurmctld slurmd slurm-client munge slurmdbd mariadb-server
# No systemd: every daemon runs in the foreground of its own session, its PID is written to
# $TDA_SLURM_DIR/pids/<name>.pid, and `down` stops exactly those PIDs. Config, state, logs
# and the database live in $TDA_SLURM_DIR (default /tmp/tda-bench-slurm). `up` and `down`
# are idempotent. Accounting (slurmdbd + MariaDB) is not optional: without `sacct`, submitit
# polls forever on a cancelled or killed job.
#
# Environment (all optional): TDA_SLURM_DIR, TDA_SLURM_PORT_BASE (default 16810: ctld +7,
# slurmd +8, dbd +9, mariadb +6), TDA_SLURM_CLUSTER (default tdabench).
set -euo pipefail

DIR=${TDA_SLURM_DIR:-/tmp/tda-bench-slurm}
BASE=${TDA_SLURM_PORT_BASE:-16810}
CLUSTER=${TDA_SLURM_CLUSTER:-tdabench}
CTLD_PORT=$((BASE + 7)); SLURMD_PORT=$((BASE + 8)); DBD_PORT=$((BASE + 9)); DB_PORT=$((BASE + 6))
HOST=$(hostname -s)
CONF=$DIR/etc/slurm.conf
DB_PASS=tdabench-slurmdbd
PACKAGES="slurmctld slurmd slurm-client munge slurmdbd mariadb-server"
export SLURM_CONF=$CONF

say() { echo "slurm_cluster: $*" >&2; }
die() { say "error: $*"; exit 1; }

pid_of() { [ -f "$DIR/pids/$1.pid" ] && cat "$DIR/pids/$1.pid" || true; }
alive() { local p; p=$(pid_of "$1"); [ -n "$p" ] && kill -0 "$p" 2>/dev/null; }

# start NAME CMD...: runs CMD in the foreground of a new session, records its PID.
start() {
    local name=$1; shift
    if alive "$name"; then say "$name already running (pid $(pid_of "$name"))"; return; fi
    setsid "$@" >"$DIR/log/$name.out" 2>&1 </dev/null &
    echo $! >"$DIR/pids/$name.pid"
    say "started $name (pid $!)"
}

# wait_for WHAT SECONDS CMD...: polls CMD until it succeeds.
wait_for() {
    local what=$1 limit=$2; shift 2
    for _ in $(seq $((limit * 4))); do
        if "$@" >/dev/null 2>&1; then return 0; fi
        if [ -f "$DIR/pids/$what.pid" ] && ! alive "$what"; then
            die "$what exited; see $DIR/log/$what.out"
        fi
        sleep 0.25
    done
    die "$what did not come up within ${limit}s; logs in $DIR/log"
}

cluster_responds() { sinfo -h -o %T 2>/dev/null | grep -Eq '^(idle|mixed|allocated)'; }

install_packages() {
    local missing=""
    for p in $PACKAGES; do dpkg -s "$p" >/dev/null 2>&1 || missing="$missing $p"; done
    [ -z "$missing" ] && { say "packages present"; return; }
    say "installing$missing"
    apt-get update -qq >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $missing >&2
}

write_configs() {
    local node_line mem
    node_line=$(slurmd -C 2>/dev/null | head -n1)
    [[ $node_line == NodeName=* ]] || die "slurmd -C printed no NodeName line"
    mem=$(sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p' <<<"$node_line")
    cat >"$CONF" <<EOF
# Written by scripts/slurm_cluster.sh: a single-node cluster on loopback.
ClusterName=$CLUSTER
SlurmctldHost=$HOST(127.0.0.1)
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CryptoType=crypto/munge
MpiDefault=none
MailProg=/bin/true
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
SchedulerType=sched/backfill
ReturnToService=2
KillWait=5
InactiveLimit=0
MinJobAge=300
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/run/slurmctld.pid
SlurmdPidFile=$DIR/run/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
AccountingStoragePort=$DBD_PORT
JobAcctGatherType=jobacct_gather/linux
JobAcctGatherFrequency=30
DefMemPerCPU=$((mem / 4))
$node_line NodeAddr=127.0.0.1 State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
    cat >"$DIR/etc/slurmdbd.conf" <<EOF
# Written by scripts/slurm_cluster.sh.
AuthType=auth/munge
DbdHost=localhost
DbdPort=$DBD_PORT
SlurmUser=root
PidFile=$DIR/run/slurmdbd.pid
LogFile=$DIR/log/slurmdbd.log
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$DB_PORT
StorageUser=slurm
StoragePass=$DB_PASS
StorageLoc=slurm_acct_db
EOF
    chmod 600 "$DIR/etc/slurmdbd.conf"
}

start_munge() {
    if alive munged; then say "munged already running (pid $(pid_of munged))"; return; fi
    if munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
        say "munged already answering (not started by this script; left alone)"
        return
    fi
    [ -f /etc/munge/munge.key ] || die "/etc/munge/munge.key is missing (reinstall munge)"
    mkdir -p /run/munge && chown munge:munge /run/munge && chmod 755 /run/munge
    start munged setpriv --reuid=munge --regid=munge --init-groups /usr/sbin/munged --foreground
    wait_for munged 20 sh -c 'munge -n | unmunge'
}

start_mariadb() {
    local db=$DIR/mysql run=$DIR/mysql-run
    mkdir -p "$run" && chown mysql:mysql "$run"
    if [ ! -d "$db/mysql" ]; then
        mkdir -p "$db" && chown mysql:mysql "$db"
        mariadb-install-db --user=mysql --datadir="$db" --skip-test-db \
            >"$DIR/log/mariadb-install.out" 2>&1 || die "mariadb-install-db failed (see log)"
    fi
    start mariadbd /usr/sbin/mariadbd --user=mysql --datadir="$db" --socket="$run/mysql.sock" \
        --port="$DB_PORT" --bind-address=127.0.0.1 --pid-file="$run/mariadbd.pid" \
        --log-error="$run/mariadbd.log" --skip-log-bin
    wait_for mariadbd 60 mariadb -S "$run/mysql.sock" -u root -e 'select 1'
    mariadb -S "$run/mysql.sock" -u root <<EOF
CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY '$DB_PASS';
CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY '$DB_PASS';
GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';
GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost';
FLUSH PRIVILEGES;
EOF
}

up() {
    [ "$(id -u)" = 0 ] || die "run as root (the daemons and munge need it)"
    for b in slurmctld slurmd slurmdbd munged mariadbd sinfo sacctmgr; do
        command -v "$b" >/dev/null || [ -x "/usr/sbin/$b" ] ||
            die "$b not found: run '$0 install' (apt-get install $PACKAGES)"
    done
    if alive slurmctld && alive slurmd && cluster_responds; then
        say "already up"; print_env; return
    fi
    mkdir -p "$DIR"/{etc,state,spool,run,log,pids}
    chmod 755 "$DIR"
    write_configs
    start_munge
    start_mariadb
    start slurmdbd slurmdbd -D  # reads slurmdbd.conf beside $SLURM_CONF
    wait_for slurmdbd 60 sacctmgr -n list cluster
    if ! sacctmgr -n -P list cluster format=cluster | grep -qx "$CLUSTER"; then
        sacctmgr -i add cluster "$CLUSTER" >/dev/null
    fi
    start slurmctld slurmctld -D -i -f "$CONF"
    wait_for slurmctld 60 scontrol ping
    start slurmd slurmd -D -f "$CONF" -N "$(sed -n 's/^NodeName=\([^ ]*\).*/\1/p' "$CONF")"
    wait_for slurmd 60 cluster_responds
    say "up: $(sinfo -h -o '%P %D nodes, %c CPUs, %m MiB, %T')"
    print_env >"$DIR/env.sh"
    print_env
}

print_env() {
    echo "export SLURM_CONF=$CONF"
}

stop_pid() {  # stop_pid NAME: SIGTERM the recorded PID, then SIGKILL after 15 s.
    local name=$1 pid
    pid=$(pid_of "$name")
    [ -n "$pid" ] || return 0
    if kill -0 "$pid" 2>/dev/null; then
        kill -TERM "$pid" 2>/dev/null || true
        for _ in $(seq 60); do kill -0 "$pid" 2>/dev/null || break; sleep 0.25; done
        if kill -0 "$pid" 2>/dev/null; then kill -KILL "$pid" 2>/dev/null || true; fi
        say "stopped $name (pid $pid)"
    fi
    rm -f "$DIR/pids/$name.pid"
}

down() {
    if alive slurmctld && scontrol ping >/dev/null 2>&1; then
        scancel --full --cluster="$CLUSTER" --user="$(id -un)" 2>/dev/null || true
        for _ in $(seq 60); do
            [ -z "$(squeue -h -o %i 2>/dev/null)" ] && break; sleep 0.25
        done
    fi
    for name in slurmd slurmctld slurmdbd mariadbd munged; do stop_pid "$name"; done
    say "down"
}

status() {
    local ok=0
    for name in munged mariadbd slurmdbd slurmctld slurmd; do
        if alive "$name"; then echo "$name: running (pid $(pid_of "$name"))"
        else echo "$name: not running"; ok=1; fi
    done
    if cluster_responds; then sinfo; else echo "sinfo: cluster does not respond"; ok=1; fi
    return $ok
}

case ${1:-} in
    up) up ;;
    down) down ;;
    status) status ;;
    env) print_env ;;
    install) install_packages ;;
    *) echo "usage: $0 {install|up|down|status|env}" >&2; exit 2 ;;
esac
