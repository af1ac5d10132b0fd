#!/usr/bin/env bash
# Starts (or stops) the registries `bench peers` compares the ConfigServer
# with: ZooKeeper and etcd from Debian's packages, on loopback, each with a
# fresh data directory. No systemd: both run as plain background processes
# whose pids are written next to their data, where the bench reads them to
# measure their CPU and memory.
#
#   crates/bench/peers.sh start    install if missing, start, wait until ready
#   crates/bench/peers.sh stop     stop both and delete their data
#   crates/bench/peers.sh status
#
# Environment: PEERS_DIR (default /tmp/tern-peers), ZK_PORT (2181),
# ETCD_PORT (2379), ETCD_PEER_PORT (2380).
set -euo pipefail

PEERS_DIR="${PEERS_DIR:-/tmp/tern-peers}"
ZK_PORT="${ZK_PORT:-2181}"
ETCD_PORT="${ETCD_PORT:-2379}"
ETCD_PEER_PORT="${ETCD_PEER_PORT:-2380}"
# Bound on waiting for a server to answer, in tenths of a second.
READY_TRIES=300

log() { printf 'peers: %s\n' "$*" >&2; }

install_if_missing() {
    local missing=()
    [ -f /usr/share/java/zookeeper.jar ] || missing+=(zookeeper)
    command -v etcd >/dev/null || missing+=(etcd-server)
    command -v java >/dev/null || missing+=(default-jre-headless)
    [ ${#missing[@]} -eq 0 ] && return 0
    if [ "$(id -u)" != 0 ]; then
        log "missing packages: ${missing[*]}; run as root or: sudo apt-get install -y ${missing[*]}"
        exit 1
    fi
    log "installing ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

running() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

# Fails if something already listens on 127.0.0.1:$2: the readiness probe
# would take that server for ours.
port_free() {
    if (exec 3<>"/dev/tcp/127.0.0.1/$2") 2>/dev/null; then
        log "cannot start $1: 127.0.0.1:$2 is already in use by another process (set ${1^^}_PORT or stop it)"
        exit 1
    fi
}

# Waits until `probe` succeeds; fails with the server's log otherwise, or
# as soon as the server has exited (e.g. its port is taken by another).
wait_ready() {
    local name=$1 logfile=$2 probe=$3 pidfile
    pidfile="$(dirname "$logfile")/pid"
    for _ in $(seq "$READY_TRIES"); do
        if ! running "$pidfile"; then
            log "$name exited while starting; last lines of $logfile:"
            tail -20 "$logfile" >&2
            exit 1
        fi
        if eval "$probe" >/dev/null 2>&1; then
            log "$name ready"
            return 0
        fi
        sleep 0.1
    done
    log "$name did not become ready in $((READY_TRIES / 10)) s; last lines of $logfile:"
    tail -20 "$logfile" >&2
    exit 1
}

zk_ruok() {
    # ZooKeeper's four-letter health check over bash's /dev/tcp.
    exec 3<>"/dev/tcp/127.0.0.1/$ZK_PORT" && printf ruok >&3 && [ "$(timeout 2 cat <&3)" = imok ]
}

start_zookeeper() {
    local dir="$PEERS_DIR/zookeeper"
    if running "$dir/pid"; then log "zookeeper already running (pid $(cat "$dir/pid"))"; return 0; fi
    port_free zk "$ZK_PORT"
    rm -rf "$dir" && mkdir -p "$dir/data"
    # The settings Dubbo deployments use, plus: no connection cap per client
    # address (every bench session comes from 127.0.0.1) and no admin server.
    cat >"$dir/zoo.cfg" <<EOF
tickTime=2000
dataDir=$dir/data
clientPort=$ZK_PORT
clientPortAddress=127.0.0.1
maxClientCnxns=0
admin.enableServer=false
4lw.commands.whitelist=ruok,srvr
EOF
    # zkServer.sh wants the Debian layout under /etc; the server itself only
    # needs these jars.
    local cp="" jar
    for jar in zookeeper zookeeper-jute slf4j-api slf4j-nop netty-handler netty-transport netty-common \
        netty-buffer netty-codec netty-resolver netty-transport-native-epoll \
        netty-transport-native-unix-common metrics-core snappy-java commons-cli; do
        cp="$cp:/usr/share/java/$jar.jar"
    done
    nohup java -Xms256m -Xmx1g -cp "${cp#:}" org.apache.zookeeper.server.quorum.QuorumPeerMain "$dir/zoo.cfg" \
        >"$dir/log" 2>&1 </dev/null &
    echo $! >"$dir/pid"
    wait_ready zookeeper "$dir/log" zk_ruok
}

start_etcd() {
    local dir="$PEERS_DIR/etcd"
    if running "$dir/pid"; then log "etcd already running (pid $(cat "$dir/pid"))"; return 0; fi
    port_free etcd "$ETCD_PORT"
    port_free etcd "$ETCD_PEER_PORT"
    rm -rf "$dir" && mkdir -p "$dir"
    nohup etcd --name bench --data-dir "$dir/data" \
        --listen-client-urls "http://127.0.0.1:$ETCD_PORT" --advertise-client-urls "http://127.0.0.1:$ETCD_PORT" \
        --listen-peer-urls "http://127.0.0.1:$ETCD_PEER_PORT" --initial-advertise-peer-urls "http://127.0.0.1:$ETCD_PEER_PORT" \
        --initial-cluster "bench=http://127.0.0.1:$ETCD_PEER_PORT" --log-level warn \
        >"$dir/log" 2>&1 </dev/null &
    echo $! >"$dir/pid"
    wait_ready etcd "$dir/log" "timeout 2 bash -c 'exec 3<>/dev/tcp/127.0.0.1/$ETCD_PORT && printf \"GET /health HTTP/1.0\r\n\r\n\" >&3 && grep -q \"\\\"health\\\":\\\"true\\\"\" <&3'"
}

stop_one() {
    local name=$1 dir="$PEERS_DIR/$1"
    if running "$dir/pid"; then
        local pid
        pid=$(cat "$dir/pid")
        kill "$pid"
        for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -0 "$pid" 2>/dev/null && kill -9 "$pid"
        log "$name stopped"
    fi
    rm -rf "$dir"
}

case "${1:-}" in
start)
    install_if_missing
    mkdir -p "$PEERS_DIR"
    start_zookeeper
    start_etcd
    echo "zookeeper 127.0.0.1:$ZK_PORT pid $(cat "$PEERS_DIR/zookeeper/pid")"
    echo "etcd 127.0.0.1:$ETCD_PORT pid $(cat "$PEERS_DIR/etcd/pid")"
    ;;
stop)
    stop_one zookeeper
    stop_one etcd
    ;;
status)
    for name in zookeeper etcd; do
        if running "$PEERS_DIR/$name/pid"; then echo "$name running (pid $(cat "$PEERS_DIR/$name/pid"))"; else echo "$name stopped"; fi
    done
    ;;
*)
    echo "usage: $0 start|stop|status" >&2
    exit 2
    ;;
esac
