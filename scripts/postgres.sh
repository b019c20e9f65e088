#!/usr/bin/env bash
# Install and start a local PostgreSQL (127.0.0.1 only) for the multi-worker tests, then print the
# Optuna storage URL to use (the only line on stdout). Debian/Ubuntu, run as root. Idempotent.
#
# The role `harness` gets a random password, made on the first run and kept in the ~/.pgpass of the
# user who ran this (the sudo user under sudo; $PGPASSFILE if set), mode 0600. libpq, and so
# psycopg and Optuna's storage, reads that file itself: the printed URL names no password, so it
# can be shown, logged and exported to CI. A later run keeps the password it finds there.
set -euo pipefail
role=harness
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
    port=$(pg_lsclusters -h | awk -v v="$version" '$1 == v && $2 == "main" {print $3}')

    owner=${SUDO_USER:-$(id -un)}
    pgpass=${PGPASSFILE:-$(getent passwd "$owner" | cut -d: -f6)/.pgpass}
    entry="127.0.0.1:$port:*:$role:"  # any database: the tests make a fresh one per run
    password=$(awk -v e="$entry" 'index($0, e) == 1 {print substr($0, length(e) + 1); exit}' "$pgpass" 2>/dev/null || true)
    if [ -z "$password" ]; then
        password=$(head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n')  # hex: nothing to escape in a URL or .pgpass
        (umask 077 && printf '%s%s\n' "$entry" "$password" >>"$pgpass")
    fi
    chown "$owner" "$pgpass"
    chmod 600 "$pgpass"  # libpq ignores a password file that others can read

    su postgres -c "psql -tAc \"SELECT 1 FROM pg_roles WHERE rolname='$role'\"" | grep -q 1 ||
        su postgres -c "psql -qc \"CREATE ROLE $role LOGIN CREATEDB\""
    # Through stdin, not an argument: a command line is visible to every user (ps, /proc).
    su postgres -c "psql -q -v ON_ERROR_STOP=1" <<SQL
\set password '$password'
ALTER ROLE $role PASSWORD :'password';
SQL
    su postgres -c "psql -tAc \"SELECT 1 FROM pg_database WHERE datname='$role'\"" | grep -q 1 ||
        su postgres -c "createdb -O $role $role"
} >&2 </dev/null
echo "postgresql://$role@127.0.0.1:$port/$role"
