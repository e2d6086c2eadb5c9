#!/usr/bin/env bash
# NATS for the split-learning tests: Debian's nats-server on loopback.
#   .ci/nats.sh install        install nats-server with apt-get if missing
#   .ci/nats.sh start [PORT]   install if needed, start on 127.0.0.1:PORT (default 4222), wait until it listens
#   .ci/nats.sh stop           stop the server this script started
# The umbra-vfl tests start their own server on a free port; they only need the binary.
set -euo pipefail
PIDFILE="${NATS_PIDFILE:-/tmp/umbra-nats.pid}"

find_bin() {
  command -v nats-server 2>/dev/null || { [ -x /usr/sbin/nats-server ] && echo /usr/sbin/nats-server; } || true
}

install() {
  if [ -z "$(find_bin)" ]; then
    SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq nats-server
  fi
  BIN="$(find_bin)"
  [ -n "$BIN" ] || { echo "nats-server missing after apt-get install nats-server" >&2; exit 1; }
  echo "$BIN"
}

case "${1:-}" in
  install) install ;;
  start)
    PORT="${2:-4222}"
    BIN="$(install)"
    "$BIN" -a 127.0.0.1 -p "$PORT" >/tmp/umbra-nats.log 2>&1 &
    echo $! > "$PIDFILE"
    for _ in $(seq 1 100); do
      if (exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null; then echo "nats-server listening on 127.0.0.1:$PORT (pid $(cat "$PIDFILE"))"; exit 0; fi
      sleep 0.1
    done
    echo "nats-server did not start; see /tmp/umbra-nats.log" >&2; exit 1 ;;
  stop)
    if [ -f "$PIDFILE" ]; then kill "$(cat "$PIDFILE")" 2>/dev/null || true; rm -f "$PIDFILE"; fi ;;
  *) echo "usage: $0 install|start [PORT]|stop" >&2; exit 2 ;;
esac
