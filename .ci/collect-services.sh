# Sourced by .ci/run: what the `preflab collect` tests need besides Python packages, from Debian.
#   - chromium: the browser test drives it with Playwright (Playwright's own browser download is not used)
#   - postgresql: a server on loopback; PREFLAB_TEST_POSTGRES tells the tests where (they fail under CI without it)
# Idempotent: skips installs already there, reuses a running cluster, role and database.
need=()
command -v chromium >/dev/null 2>&1 || need+=(chromium)
dpkg -s postgresql >/dev/null 2>&1 || need+=(postgresql)
if [ "${#need[@]}" -gt 0 ]; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi
pg_version=$(ls /usr/lib/postgresql | sort -V | tail -1)
pg_lsclusters -h | grep -q "^$pg_version main" || pg_createcluster "$pg_version" main >/dev/null
pg_ctlcluster "$pg_version" main start 2>/dev/null || true
pg_port=$(pg_lsclusters -h | awk -v v="$pg_version" '$1 == v && $2 == "main" {print $3}')
for _ in $(seq 1 30); do pg_isready -q -h 127.0.0.1 -p "$pg_port" && break; sleep 1; done
pg_isready -h 127.0.0.1 -p "$pg_port"
psql_admin() { su postgres -c "psql -p $pg_port -tAc \"$1\""; }
[ "$(psql_admin "SELECT 1 FROM pg_roles WHERE rolname = 'preflab'")" = 1 ] ||
  psql_admin "CREATE ROLE preflab LOGIN PASSWORD 'preflab' CREATEDB" >/dev/null
[ "$(psql_admin "SELECT 1 FROM pg_database WHERE datname = 'preflab_test'")" = 1 ] ||
  psql_admin "CREATE DATABASE preflab_test OWNER preflab" >/dev/null
export PREFLAB_TEST_POSTGRES="postgresql://preflab:preflab@127.0.0.1:$pg_port/preflab_test"
