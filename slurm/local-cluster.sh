#!/usr/bin/env bash
# A real SLURM cluster of one or more nodes on this machine, for testing the sweep launcher and the
# multi-node sbatch scripts: munged, mariadbd, slurmdbd, slurmctld and one slurmd per node, all
# configured and owned by a state directory, so that the machine's own SLURM setup (if any) is never
# touched.
#
#   bash slurm/local-cluster.sh up [--nodes N] install what is missing, start, wait for idle nodes
#                                             (N nodes, default 1; a running cluster of another size
#                                             is reconfigured: its jobs are cancelled)
#   bash slurm/local-cluster.sh down [--purge] cancel our jobs, stop what `up` started (--purge: delete the state)
#   bash slurm/local-cluster.sh status        our daemons, sinfo, squeue; exit 0 only when all run
#
# The nodes are called n1, n2, ... (names that resolve nowhere, as on clusters whose node names are
# not host names: whatever connects to a node must use its NodeAddr, 127.0.0.1 here). Each runs its own
# slurmd (`slurmd -N nI`, its own port; spool, pid and log files named by %n) and advertises all of this
# machine's CPUs. Partition debug (the default) spans every node; low and high hold n1 only, so that a
# high job can only run by preempting a low one.
#
# `up` prints `export SLURM_CONF=...` on stdout (progress goes to stderr), so
#   eval "$(bash slurm/local-cluster.sh up)"
# leaves a shell whose sbatch/squeue/sacct talk to this cluster. Written for Debian 12 with
# SLURM 22.05 from Debian, run as root, with no init system starting services for us.
#
# Environment:
#   ADVFT_SLURM_STATE      state directory (config, pid files, logs, spool, database) [/var/lib/advft-slurm]
#   ADVFT_SLURM_PORT_BASE  first of the TCP ports: slurmctld, slurmd of n1, slurmdbd, mariadbd, then
#                          the slurmd of n2, n3, ... [16817]
#   ADVFT_SLURM_TIMEOUT    seconds to wait for each daemon and for the idle node [90]
set -euo pipefail

STATE=$(realpath -m "${ADVFT_SLURM_STATE:-/var/lib/advft-slurm}")
TEMPLATES=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/conf
PORT_BASE=${ADVFT_SLURM_PORT_BASE:-16817}
TIMEOUT=${ADVFT_SLURM_TIMEOUT:-90}

CLUSTER=advft
HOST=localhost  # the controller's and slurmdbd's host name
PACKAGES=(slurmctld slurmd slurm-client munge slurmdbd mariadb-server-core mariadb-client-core)
# Start order; `down` stops them in reverse, then the node daemons (slurmd-n1, ...; process name slurmd).
DAEMONS=(munged mariadbd slurmdbd slurmctld)

# Ports next to, not on, SLURM's defaults (6817-6819) and MariaDB's (3306): a real cluster's
# daemons or a system database on this machine keep theirs.
CTLD_PORT=$PORT_BASE
SLURMD_PORT=$((PORT_BASE + 1))
DBD_PORT=$((PORT_BASE + 2))
DB_PORT=$((PORT_BASE + 3))
node_port() { # I -> the port of node nI's slurmd
    if (($1 == 1)); then echo "$SLURMD_PORT"; else echo $((PORT_BASE + 2 + $1)); fi
}

ETC=$STATE/etc
RUN=$STATE/run
LOGS=$STATE/log
SPOOL=$STATE/spool
DATADIR=$STATE/mariadb
MUNGE_DIR=$STATE/munge
MUNGE_SOCKET=$MUNGE_DIR/munge.socket
DB_SOCKET=$RUN/mariadb.sock
MARKER=$STATE/.advft-slurm
NODES_FILE=$ETC/nodes  # the node count of the config in $ETC
export SLURM_CONF=$ETC/slurm.conf

say() { echo "local-cluster: $*" >&2; }
die() { say "error: $*"; exit 1; }

# --- daemons and their pid files --------------------------------------------------------------

pid_of() { # NAME -> the pid `up` recorded for NAME, if that process is still NAME (slurmd-nI: slurmd)
    local file=$RUN/$1.pid pid
    [[ -r $file ]] || return 1
    pid=$(<"$file")
    [[ $pid =~ ^[0-9]+$ ]] || return 1
    # The name check guards against killing an unrelated process that reused an old pid.
    [[ -r /proc/$pid/comm && $(<"/proc/$pid/comm") == "${1%%-*}" ]] || return 1
    # A zombie has exited but keeps its /proc entry until init reaps it, which can take seconds.
    local stat
    stat=$(< "/proc/$pid/stat") 2> /dev/null || return 1
    stat=${stat##*) }
    [[ ${stat:0:1} != Z ]] || return 1
    echo "$pid"
}

running() { pid_of "$1" > /dev/null; }

configured_nodes() { # the node count of the current config (0: none, or one older than node counts)
    if [[ -r $NODES_FILE ]]; then cat "$NODES_FILE"; else echo 0; fi
}

node_names() { # N -> n1 ... nN
    local i
    for ((i = 1; i <= $1; i++)); do echo "n$i"; done
}

node_daemons() { # the slurmd of every node that has a pid file (whatever the config says now)
    local f
    for f in "$RUN"/slurmd*.pid; do
        [[ -e $f && $f != *.self.pid ]] && basename "$f" .pid
    done
    return 0
}

all_daemons() { # every daemon of a cluster of N nodes, in start order
    local n
    printf '%s\n' "${DAEMONS[@]}"
    for n in $(node_names "$1"); do echo "slurmd-$n"; done
}

any_running() {
    local d
    for d in "${DAEMONS[@]}" $(node_daemons); do running "$d" && return 0; done
    return 1
}

all_running() { # N: every daemon of a cluster of N nodes runs
    local d
    for d in $(all_daemons "$1"); do running "$d" || return 1; done
    return 0
}

start() { # NAME COMMAND...: run COMMAND in the foreground of its own session, in the background of ours
    local name=$1; shift
    # setsid detaches the daemon from our terminal and process group (a Ctrl-C or a closing
    # terminal must not reach it); it execs in place, so $! is the daemon's own pid.
    # 9>&-: the daemon must not inherit (and so hold forever) the lock of lock_state.
    setsid "$@" > "$LOGS/$name.out" 2>&1 < /dev/null 9>&- &
    local pid=$! i
    echo "$pid" > "$RUN/$name.pid"
    # Until setsid (and setpriv) have exec'd, the process is not yet called $name.
    for ((i = 0; i < 50; i++)); do
        if running "$name" || ! kill -0 "$pid" 2> /dev/null; then break; fi
        sleep 0.1
    done
    say "started $name (pid $pid)"
}

show_logs() { # the tail of each daemon's log, and of its stderr where that says something else
    local d out_last
    for d in "${DAEMONS[@]}" $(node_daemons); do
        if [[ -s $LOGS/$d.log ]]; then
            echo "----- $LOGS/$d.log (last lines)" >&2
            tail -n 15 "$LOGS/$d.log" >&2
        fi
        [[ -s $LOGS/$d.out ]] || continue
        # munged logs only to stderr. The slurm daemons mirror their log there in the
        # foreground, but what precedes the log file (a config they cannot parse) is only there.
        out_last=$(tail -n 1 "$LOGS/$d.out")
        if [[ -s $LOGS/$d.log && $(tail -n 1 "$LOGS/$d.log") == *"${out_last#"$d: "}" ]]; then
            continue
        fi
        echo "----- $LOGS/$d.out (last lines)" >&2
        tail -n 15 "$LOGS/$d.out" >&2
    done
}

wait_until() { # NAME WHAT COMMAND...: poll COMMAND until it succeeds; fail early if daemon NAME died
    local name=$1 what=$2 deadline=$((SECONDS + TIMEOUT))
    shift 2
    until "$@" > /dev/null 2>&1; do
        if ! running "$name"; then
            show_logs
            die "$name exited while waiting for $what (logs above, state in $STATE)"
        fi
        if ((SECONDS >= deadline)); then
            show_logs
            die "timed out after ${TIMEOUT}s waiting for $what (logs above; \`$0 down\` stops what is running)"
        fi
        sleep 0.5
    done
}

stop() { # NAME: TERM, then KILL after a grace period
    local name=$1 pid i
    if ! pid=$(pid_of "$name"); then
        rm -f "$RUN/$name.pid"
        return 0
    fi
    kill -TERM "$pid" 2> /dev/null || true
    for ((i = 0; i < 40; i++)); do
        running "$name" || break
        sleep 0.5
    done
    if running "$name"; then
        say "$name (pid $pid) ignored SIGTERM for 20 s; sending SIGKILL"
        kill -KILL "$pid" 2> /dev/null || true
        sleep 0.5
    fi
    rm -f "$RUN/$name.pid"
    say "stopped $name (pid $pid)"
}

# --- installation -------------------------------------------------------------------------------

missing_packages() {
    local p
    for p in "${PACKAGES[@]}"; do
        [[ $(dpkg-query -W -f='${Status}' "$p" 2> /dev/null) == "install ok installed" ]] || echo "$p"
    done
}

install_packages() {
    local missing
    mapfile -t missing < <(missing_packages)
    ((${#missing[@]})) || return 0
    ((EUID == 0)) || die "packages missing: ${missing[*]}; as root: apt-get install ${missing[*]}"
    say "installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    # The package lists may be absent (fresh container) or stale (a package moved): refresh them
    # once, only when the install cannot find what it needs.
    if ! apt-get install -y --no-install-recommends "${missing[@]}" >&2; then
        say "apt-get install failed; running apt-get update once and retrying"
        apt-get update >&2
        apt-get install -y --no-install-recommends "${missing[@]}" >&2
    fi
}

# --- configuration ------------------------------------------------------------------------------

probe_node() { # sets NODE_CPUS and NODE_MEM (MB) from `slurmd -C`
    local probe
    probe=$(slurmd -C 2> /dev/null | head -n 1)
    NODE_CPUS=$(sed -n 's/.*\bCPUs=\([0-9]*\).*/\1/p' <<< "$probe")
    NODE_MEM=$(sed -n 's/.*\bRealMemory=\([0-9]*\).*/\1/p' <<< "$probe")
    [[ -n $NODE_CPUS && -n $NODE_MEM ]] || die "could not read the node's CPUs and memory from \`slurmd -C\`: $probe"
}

db_password() {
    if [[ ! -s $ETC/db.pass ]]; then
        (umask 077 && od -An -N16 -tx1 /dev/urandom | tr -d ' \n' > "$ETC/db.pass")
    fi
    cat "$ETC/db.pass"
}

render() { # TEMPLATE OUT NAME=VALUE...: write TEMPLATE to OUT with each @NAME@ replaced by VALUE
    local template=$1 out=$2 text pair
    shift 2
    text=$(< "$template")
    for pair in "$@"; do
        # Both sides quoted: no pattern characters, and no `&` meaning "the match" (bash 5.2).
        text=${text//"@${pair%%=*}@"/"${pair#*=}"}
    done
    [[ ! $text =~ @[A-Z_]+@ ]] || die "$template: no value given for ${BASH_REMATCH[0]}"
    printf '%s\n' "$text" > "$out"
}

write_config() { # N: a cluster of N nodes
    local nodes=$1 n i lines=""
    probe_node
    # A job that asks for no memory gets this much per CPU; small enough that every CPU of the
    # node can hold such a job.
    local def_mem=$((NODE_MEM / NODE_CPUS < 2000 ? NODE_MEM / NODE_CPUS : 2000))
    # Flat (one socket, one thread per core, every CPU a core): see the template.
    for ((i = 1; i <= nodes; i++)); do
        n=n$i
        lines+="NodeName=$n NodeAddr=127.0.0.1 Port=$(node_port "$i") CPUs=$NODE_CPUS Sockets=1 "
        lines+="CoresPerSocket=$NODE_CPUS ThreadsPerCore=1 RealMemory=$NODE_MEM State=UNKNOWN"$'\n'
        mkdir -p "$SPOOL/slurmd-$n"
    done
    local all
    all=$(node_names "$nodes" | paste -sd,)
    local common=(STATE="$STATE" HOST="$HOST" MUNGE_SOCKET="$MUNGE_SOCKET" DBD_PORT="$DBD_PORT")
    render "$TEMPLATES/slurm.conf.in" "$ETC/slurm.conf" "${common[@]}" CLUSTER="$CLUSTER" \
        CTLD_PORT="$CTLD_PORT" SLURMD_PORT="$SLURMD_PORT" DEF_MEM_PER_CPU="$def_mem" \
        NODE_LINES="${lines%$'\n'}" ALL_NODES="$all" FIRST_NODE=n1
    (umask 077 && render "$TEMPLATES/slurmdbd.conf.in" "$ETC/slurmdbd.conf" "${common[@]}" \
        DB_PORT="$DB_PORT" DB_PASSWORD="$(db_password)")
    chmod 600 "$ETC/slurmdbd.conf"
    echo "$nodes" > "$NODES_FILE"
    echo "export SLURM_CONF=$SLURM_CONF" > "$STATE/env.sh"
}

prepare_state() {
    # The munge socket path must fit a sockaddr_un (108 bytes).
    ((${#MUNGE_SOCKET} < 100)) || die "state directory path too long for a unix socket: $STATE"
    mkdir -p "$STATE" "$ETC" "$RUN" "$LOGS" "$SPOOL/slurmctld" "$MUNGE_DIR"
    touch "$MARKER"
    # munged runs as user munge and refuses a key or log that others could touch, and a socket
    # that others could not reach: the directory is theirs to traverse, not to list or write.
    chown munge:munge "$MUNGE_DIR"
    chmod 711 "$MUNGE_DIR"
    if [[ ! -s $MUNGE_DIR/munge.key ]]; then
        dd if=/dev/urandom of="$MUNGE_DIR/munge.key" bs=1024 count=1 status=none
    fi
    chown munge:munge "$MUNGE_DIR/munge.key"
    chmod 400 "$MUNGE_DIR/munge.key"
}

# --- up / down / status -------------------------------------------------------------------------

munge_works() { munge -S "$MUNGE_SOCKET" -n | unmunge -S "$MUNGE_SOCKET"; }
# shellcheck disable=SC2120 # its arguments come through wait_until
db_sql() { mariadb --no-defaults --socket="$DB_SOCKET" -u root "$@"; }
dbd_answers() { sacctmgr -n list cluster format=cluster; }
ctld_answers() { scontrol ping | grep -q UP; }
# Idle on a fresh start; mixed or allocated when jobs kept running across a partial restart.
# (A suffix such as idle* would mean the node is not responding.)
node_ready() { [[ $(sinfo -h -n "$1" -p debug -o %T) =~ ^(idle|mixed|allocated)$ ]]; }
sacct_works() { sacct -n -X -S now; }

start_munged() {
    running munged && return 0
    start munged setpriv --reuid=munge --regid=munge --init-groups \
        munged --foreground --socket="$MUNGE_SOCKET" --key-file="$MUNGE_DIR/munge.key" \
        --pid-file="$MUNGE_DIR/munged.pid" \
        --seed-file="$MUNGE_DIR/munged.seed"
    wait_until munged "munge to answer on $MUNGE_SOCKET" munge_works
}

start_mariadbd() {
    if ! running mariadbd; then
        if [[ ! -d $DATADIR/mysql ]]; then
            say "creating a fresh MariaDB data directory in $DATADIR"
            rm -rf "$DATADIR"
            mariadb-install-db --no-defaults --datadir="$DATADIR" --user=root \
                --auth-root-authentication-method=socket --skip-test-db \
                > "$LOGS/mariadb-install-db.log" 2>&1 \
                || { tail -n 20 "$LOGS/mariadb-install-db.log" >&2; die "mariadb-install-db failed"; }
        fi
        # Only on 127.0.0.1, and small: it holds the accounting of a handful of test jobs.
        start mariadbd mariadbd --no-defaults --user=root --datadir="$DATADIR" \
            --socket="$DB_SOCKET" --port="$DB_PORT" --bind-address=127.0.0.1 --skip-name-resolve \
            --pid-file="$RUN/mariadbd.self.pid" --log-error="$LOGS/mariadbd.log" \
            --innodb-buffer-pool-size=32M
    fi
    wait_until mariadbd "MariaDB to answer on $DB_SOCKET" db_sql -e 'SELECT 1'
    # Idempotent, so that a password rewritten with the config always matches the database.
    local pass
    pass=$(db_password)
    db_sql << EOF
CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY '$pass';
ALTER USER 'slurm'@'127.0.0.1' IDENTIFIED BY '$pass';
GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';
EOF
}

start_slurmdbd() {
    # slurmdbd takes no config path: it reads slurmdbd.conf from the directory of $SLURM_CONF.
    running slurmdbd || start slurmdbd slurmdbd -D
    wait_until slurmdbd "slurmdbd to answer on port $DBD_PORT" dbd_answers
    if ! sacctmgr -n list cluster format=cluster | grep -qw "$CLUSTER"; then
        sacctmgr -i add cluster "$CLUSTER" > /dev/null
    fi
}

start_slurmctld() {
    running slurmctld || start slurmctld slurmctld -D -f "$SLURM_CONF"
    wait_until slurmctld "slurmctld to answer on port $CTLD_PORT" ctld_answers
}

start_slurmds() { # N: one slurmd per node; -N names the node it serves, whatever this machine's hostname is
    local n
    for n in $(node_names "$1"); do
        running "slurmd-$n" || start "slurmd-$n" slurmd -D -f "$SLURM_CONF" -N "$n"
    done
    for n in $(node_names "$1"); do
        wait_until "slurmd-$n" "node $n to come up" node_ready "$n"
    done
}

nodes_ready() { # N
    local n
    for n in $(node_names "$1"); do node_ready "$n" || return 1; done
}

lock_state() {
    # Two `up`s at once (parallel CI jobs, an impatient user) would start every daemon twice.
    mkdir -p "$STATE"
    exec 9> "$STATE/.lock"
    flock -w "$TIMEOUT" 9 || die "another local-cluster.sh holds $STATE/.lock"
}

already_up() { # N
    [[ $(configured_nodes) == "$1" ]] && all_running "$1" && nodes_ready "$1" > /dev/null 2>&1 || return 1
    say "already running with $1 node(s) (state in $STATE)"
    echo "export SLURM_CONF=$SLURM_CONF"
}

cmd_up() {
    local nodes=1
    while (($#)); do
        case $1 in
            --nodes) nodes=${2:-}; shift 2 || die "--nodes needs a number" ;;
            --nodes=*) nodes=${1#--nodes=}; shift ;;
            *) die "up takes only --nodes N, not $1" ;;
        esac
    done
    [[ $nodes =~ ^[1-9][0-9]?$ ]] || die "--nodes $nodes: give a node count from 1 to 99"
    already_up "$nodes" && return 0
    ((EUID == 0)) || die "run as root: the daemons run as root (and munged as user munge)"
    local t0=$SECONDS
    lock_state
    # Another `up` may have brought the cluster up while this one waited for the lock.
    already_up "$nodes" && return 0
    install_packages
    prepare_state
    if any_running && [[ $(configured_nodes) == "$nodes" ]]; then
        say "some daemons are running; keeping their config and starting the others"
    else
        if any_running; then
            # Another node count: the controller and the node daemons restart with the new config; the
            # controller keeps its state (job ids go on counting, so accounting never sees one twice).
            say "running with $(configured_nodes) node(s); reconfiguring for $nodes (cancelling jobs)"
            running slurmctld && cancel_jobs
            local d
            for d in $(node_daemons) slurmctld; do stop "$d"; done
        fi
        write_config "$nodes"
    fi
    start_munged
    start_mariadbd
    start_slurmdbd
    start_slurmctld
    start_slurmds "$nodes"
    wait_until slurmdbd "sacct to answer" sacct_works
    say "up in $((SECONDS - t0)) s: nodes $(node_names "$nodes" | paste -sd' ') $(sinfo -h -p debug -o %T | sort -u | paste -sd/), partitions debug (default, every node), low and high (n1)"
    say "state, config and logs in $STATE; stop with: ${ADVFT_SLURM_STATE:+ADVFT_SLURM_STATE=$STATE }bash $0 down"
    echo "export SLURM_CONF=$SLURM_CONF"
}

cancel_jobs() {
    # Jobs left running would outlive slurmd as orphaned slurmstepd processes.
    local jobs i
    jobs=$(squeue -h -o %A 2> /dev/null) || return 0
    [[ -n $jobs ]] || return 0
    say "cancelling jobs: $(tr '\n' ' ' <<< "$jobs")"
    # shellcheck disable=SC2086 # one word per job id
    scancel $jobs 2> /dev/null || true
    for ((i = 0; i < 60; i++)); do
        [[ -z $(squeue -h -o %A 2> /dev/null) ]] && return 0
        sleep 0.5
    done
    say "warning: jobs still listed after 30 s: $(squeue -h 2> /dev/null | tr '\n' ' ')"
}

cmd_down() {
    local purge=0 i d
    case ${1:-} in
        --purge) purge=1 ;;
        "") ;;
        *) die "down takes only --purge, not $1" ;;
    esac
    [[ -d $STATE ]] && lock_state
    if any_running; then
        running slurmctld && cancel_jobs
        for d in $(node_daemons); do stop "$d"; done
        for ((i = ${#DAEMONS[@]} - 1; i >= 0; i--)); do stop "${DAEMONS[i]}"; done
    else
        say "not running (state in $STATE)"
    fi
    if ((purge)) && [[ -d $STATE ]]; then
        # Only a directory this script made: ADVFT_SLURM_STATE could point anywhere.
        [[ -e $MARKER ]] || die "not purging $STATE: it has no $MARKER, so this script did not make it"
        rm -rf "$STATE"
        say "removed $STATE"
    fi
}

cmd_status() {
    local d pid ok=0
    for d in $({ all_daemons "$(configured_nodes)"; node_daemons; } | awk '!seen[$0]++'); do
        if pid=$(pid_of "$d"); then
            echo "$d: running (pid $pid)"
        else
            echo "$d: not running"
            ok=1
        fi
    done
    echo "SLURM_CONF=$SLURM_CONF"
    if running slurmctld; then
        sinfo || ok=1
        squeue || ok=1
    fi
    return $ok
}

case ${1:-} in
    up) shift; cmd_up "$@" ;;
    down) cmd_down "${2:-}" ;;
    status) cmd_status ;;
    *)
        echo "usage: $0 up [--nodes N] | down [--purge] | status" >&2
        exit 2
        ;;
esac
