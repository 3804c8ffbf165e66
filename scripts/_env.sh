# Shared by scripts/demo and scripts/test: make .venv with the project installed.
# Usage: source scripts/_env.sh; ensure_venv "<pip extras spec>"
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python3}"
VENV="${VENV:-$ROOT/.venv}"

as_root() { [ "$(id -u)" = 0 ]; }

apt_install() {
  # Installs Debian packages when we are root; otherwise says exactly what is missing.
  if as_root && command -v apt-get >/dev/null; then
    echo "installing with apt-get: $*" >&2
    DEBIAN_FRONTEND=noninteractive apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
  else
    echo "missing: run 'sudo apt-get install $*' and try again" >&2
    return 1
  fi
}

ensure_venv() {
  local spec="$1"
  if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
    echo "Python 3.11 or newer is needed as $PYTHON (set PYTHON=...)" >&2
    exit 1
  fi
  if [ ! -x "$VENV/bin/python" ]; then
    if ! "$PYTHON" -m venv "$VENV" 2>/dev/null; then
      rm -rf "$VENV"
      apt_install python3-venv
      "$PYTHON" -m venv "$VENV"
    fi
  fi
  "$VENV/bin/python" -m pip install -q --upgrade pip >/dev/null
  "$VENV/bin/python" -m pip install -q -e "$ROOT$spec"
}
