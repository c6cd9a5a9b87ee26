# Throwaway Postgres clusters from the installed server binaries, for the
# test command and deploy/local-cluster. Source it; it defines:
#   pg_start DIR   initdb in DIR/data, start on a free loopback port;
#                  sets PG_PORT, PG_PASSWORD and PG_URL (database postgres, user muster)
#   pg_stop DIR    stop the cluster in DIR (immediate)
#   pg_restart DIR stop and start it again on the same port
#   as_pg CMD...   run CMD as the postgres user when root (initdb refuses root)
#   random_port    a loopback port outside the kernel's ephemeral range

# A random port below the kernel's ephemeral range: servers that bind :0
# and outgoing connections take ports from that range, so a port picked
# inside it can be taken between the pick and the bind.
random_port() {
    local low=32768
    if [ -r /proc/sys/net/ipv4/ip_local_port_range ]; then
        read -r low _ </proc/sys/net/ipv4/ip_local_port_range
    fi
    [ "$low" -gt 11024 ] || low=61000
    echo $((10000 + RANDOM % (low - 10000)))
}

as_pg() {
    if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi
}

# Explicit `return 0`: a bare `return` inside an EXIT trap (cleanup after a
# failure) returns the status of the command that failed.
pg_find_bin() {
    if command -v pg_config >/dev/null 2>&1 && [ -x "$(pg_config --bindir)/initdb" ]; then
        pg_config --bindir
        return 0
    fi
    local dir
    for dir in $(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V -r) /usr/local/bin /opt/homebrew/bin; do
        [ -x "$dir/initdb" ] && { echo "$dir"; return 0; }
    done
    if command -v initdb >/dev/null 2>&1; then
        dirname "$(command -v initdb)"
        return 0
    fi
    return 1
}

pg_bin_or_die() {
    PG_BIN=$(pg_find_bin) || {
        echo "no PostgreSQL server binaries (initdb, pg_ctl) found: install PostgreSQL" >&2
        exit 1
    }
}

# A small WAL ceiling: the suite creates a database per test, and with the
# default (1 GB before a checkpoint) a run's WAL alone can fill a small disk.
# No Unix socket: everything connects over TCP, and a socket's path (in DIR,
# whose name may hold spaces or run past the 107 bytes a socket path may
# have) would only be a way for the start to fail.
pg_ctl_start() {
    local dir=$1 port=$2
    as_pg "$PG_BIN/pg_ctl" -D "$dir/data" -l "$dir/server.log" -w -t 30 \
        -o "-p $port -c unix_socket_directories='' -c listen_addresses=127.0.0.1 -c max_connections=300 -c max_wal_size=128MB -c min_wal_size=32MB" \
        start >/dev/null 2>&1
}

pg_start() {
    local dir=$1
    pg_bin_or_die
    mkdir -p "$dir"
    chmod 755 "$dir"
    [ "$(id -u)" = 0 ] && chown postgres "$dir"
    # A password of its own, not `trust`: any local user could otherwise
    # connect as the superuser, over TCP or the socket.
    local password
    password=$(od -An -tx1 -N16 /dev/urandom | tr -d ' \n')
    (umask 077 && printf '%s\n' "$password" >"$dir/pwfile")
    [ "$(id -u)" = 0 ] && chown postgres "$dir/pwfile"
    as_pg "$PG_BIN/initdb" -D "$dir/data" -U muster --auth=scram-sha-256 \
        --pwfile="$dir/pwfile" -E UTF8 >"$dir/initdb.log" 2>&1 || {
        cat "$dir/initdb.log" >&2; return 1; }
    rm -f "$dir/pwfile"
    local port
    for _ in 1 2 3 4 5 6 7 8 9 10; do
        port=$(random_port)
        if pg_ctl_start "$dir" "$port"; then
            PG_PORT=$port
            PG_PASSWORD=$password
            PG_URL="postgres://muster:$password@127.0.0.1:$port/postgres"
            echo "$port" >"$dir/port"
            return 0
        fi
    done
    cat "$dir/server.log" >&2
    echo "could not start postgres" >&2
    return 1
}

pg_stop() {
    local dir=$1
    pg_bin_or_die
    as_pg "$PG_BIN/pg_ctl" -D "$dir/data" -m immediate stop >/dev/null 2>&1 || true
}

pg_restart() {
    local dir=$1
    pg_stop "$dir"
    pg_ctl_start "$dir" "$(cat "$dir/port")"
}
