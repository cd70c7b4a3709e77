# Sourced by scripts/dev and scripts/test: make .venv with this project and its test tools installed.
# Re-installs only when pyproject.toml or this file changed since the last install.
set -euo pipefail
PY=""
for candidate in "${PYTHON:-}" python3.13 python3.12 python3.11 python3; do
  if [ -n "$candidate" ] && command -v "$candidate" >/dev/null 2>&1 &&
     "$candidate" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
    PY="$candidate"; break
  fi
done
if [ -z "$PY" ]; then
  echo "WhiskyPay Workers needs Python 3.11 or newer (set PYTHON=/path/to/python3.11)." >&2
  exit 1
fi
stamp=".venv/.whiskypay-installed"
want="$(cat pyproject.toml scripts/_venv.sh | sha256sum | cut -d' ' -f1)"
if [ ! -x .venv/bin/python ] || [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "Installing WhiskyPay Workers into .venv ..." >&2
  [ -x .venv/bin/python ] || "$PY" -m venv .venv
  .venv/bin/python -m pip install --quiet --disable-pip-version-check --upgrade pip
  .venv/bin/python -m pip install --quiet --disable-pip-version-check -e '.[test,dev]'
  # dramatiq-dashboard 0.4.0 pins dramatiq<2 and redis<5 but works on ours: see docs/dashboard.md.
  .venv/bin/python -m pip install --quiet --disable-pip-version-check --no-deps 'dramatiq-dashboard==0.4.0'
  echo "$want" > "$stamp"
fi
