#!/usr/bin/env bash
# Install and start a local PostgreSQL (127.0.0.1 only) for the multi-worker tests, then print the
# Optuna storage URL to use (the only line on stdout). Debian/Ubuntu, run as root. Idempotent.
set -euo pipefail
{
    if ! command -v pg_ctlcluster >/dev/null 2>&1; then
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql
    fi
    version=$(ls /usr/lib/postgresql | sort -n | tail -1)
    if ! pg_lsclusters -h | grep -q "^$version main"; then
        pg_createcluster "$version" main
    fi
    # Listen on loopback only.
    sed -i "s/^#\?listen_addresses.*/listen_addresses = '127.0.0.1'/" "/etc/postgresql/$version/main/postgresql.conf"
    if ! pg_lsclusters -h | grep -q "^$version main .* online"; then
        pg_ctlcluster "$version" main start
    fi
    su postgres -c "psql -tAc \"SELECT 1 FROM pg_roles WHERE rolname='harness'\"" | grep -q 1 ||
        su postgres -c "psql -qc \"CREATE USER harness PASSWORD 'harness' CREATEDB\""
    su postgres -c "psql -tAc \"SELECT 1 FROM pg_database WHERE datname='harness'\"" | grep -q 1 ||
        su postgres -c "createdb -O harness harness"
} >&2 </dev/null
echo "postgresql://harness:harness@127.0.0.1/harness"
