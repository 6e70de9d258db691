#!/usr/bin/env bash
# Start a throwaway PostgreSQL on 127.0.0.1 for the test suite, installing Debian's
# package first if needed. Prints shell exports for the tests; `.ci/postgres.sh stop DIR`
# stops it again.
set -euo pipefail
if [ "${1:-}" = stop ]; then
  bin=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -1)
  runuser -u postgres -- "$bin/pg_ctl" -D "$2" -m fast stop >/dev/null 2>&1 || true
  rm -rf "$2"
  exit 0
fi
if ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >&2
  apt-get install -y -qq postgresql >&2
fi
bin=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -1)
port=${EVOMERGE_TEST_PG_PORT:-$(python3 -c "import socket; s=socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])")}
data=$(mktemp -d /tmp/evomerge-pg.XXXXXX)
password=$(head -c 18 /dev/urandom | base64 | tr -dc 'A-Za-z0-9')
printf '%s\n' "$password" > "$data.pw"
chown postgres: "$data" "$data.pw"
runuser -u postgres -- "$bin/initdb" -D "$data" -U evomerge --auth=scram-sha-256 --pwfile="$data.pw" >/dev/null
rm -f "$data.pw"
runuser -u postgres -- "$bin/pg_ctl" -D "$data" -l "$data/server.log" -w \
  -o "-p $port -k $data -c listen_addresses=127.0.0.1" start >/dev/null
PGPASSWORD=$password psql -h 127.0.0.1 -p "$port" -U evomerge -d postgres -qc 'CREATE DATABASE evomerge_test' >/dev/null
echo "export EVOMERGE_TEST_POSTGRES_URL=postgresql://evomerge@127.0.0.1:$port/evomerge_test"
echo "export PGPASSWORD=$password"
echo "export EVOMERGE_TEST_PG_DATA=$data"
