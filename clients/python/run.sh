#!/usr/bin/env bash
# The Python wire-contract test, as CI runs it:
#
#   bash clients/python/run.sh target/debug/tagward
#
# Creates clients/python/.venv when missing (python3 -m venv) and installs
# requirements.txt into it (again whenever requirements.txt changes),
# regenerates the gRPC modules (generate.sh), then runs test_wire.py against
# the given tagward binary (default: target/debug/tagward of this checkout).
# Works from any directory; a relative binary path is taken relative to the
# directory run.sh is called from. Exit code: test_wire.py's (0: all passed).
#
# Environment: PYTHON (the interpreter that creates the venv; default
# python3), TAGWARD_WORLD (the world file; default deploy/world/example.json).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
bin="${1:-$here/../../target/debug/tagward}"
case "$bin" in
  /*) ;;
  *) bin="$PWD/$bin" ;;
esac

venv="$here/.venv"
stamp="$venv/.requirements.sha256"
want="$(sha256sum "$here/requirements.txt" | cut -d' ' -f1)"

if [ ! -x "$venv/bin/python" ]; then
  echo "== creating $venv"
  rm -rf "$venv"
  if ! "${PYTHON:-python3}" -m venv "$venv"; then
    echo "run.sh: '${PYTHON:-python3} -m venv' failed (on Debian/Ubuntu: apt-get install python3-venv)" >&2
    exit 2
  fi
fi
if [ "$(cat "$stamp" 2>/dev/null || true)" != "$want" ]; then
  echo "== installing requirements.txt"
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check --requirement "$here/requirements.txt"
  echo "$want" > "$stamp"
fi

echo "== generating tagward_pb"
PYTHON="$venv/bin/python" bash "$here/generate.sh"

echo "== test_wire.py $bin"
exec "$venv/bin/python" "$here/test_wire.py" "$bin"
