#!/usr/bin/env bash
# Set up (once) and run sparsewsi on this machine.
#
#   bash launch/local.sh test            # create .venv, install the project with its test extra, run the tests
#   bash launch/local.sh <command> ...   # any `sparsewsi` command, e.g. `bash launch/local.sh info`
#
# The virtual environment lives in .venv beside this repository (override with SPARSEWSI_VENV);
# it is created with python3.11 when available (the pinned, tested stack), else python3.
# Re-running is cheap: installation is skipped while pyproject.toml is unchanged.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${SPARSEWSI_VENV:-$repo/.venv}"
python_bin="${SPARSEWSI_PYTHON:-$(command -v python3.11 || command -v python3)}"

if [ ! -x "$venv/bin/python" ]; then
  echo "[sparsewsi] creating virtual environment $venv with $python_bin" >&2
  "$python_bin" -m venv "$venv"
fi
stamp="$venv/.sparsewsi-installed"
want="$(cat "$repo/pyproject.toml" "$repo/launch/local.sh" | sha256sum | cut -d' ' -f1)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  echo "[sparsewsi] installing sparsewsi[test] into $venv (first run takes a few minutes)" >&2
  "$venv/bin/python" -m pip install --quiet --upgrade pip
  "$venv/bin/python" -m pip install --quiet -e "$repo[test]"
  # Parity references: timm / open_clip declare torchvision, whose PyPI build does not import beside
  # the CPU torch; install them without it (tests/torchvision_stub.py covers their unused imports).
  "$venv/bin/python" -m pip install --quiet --no-deps "timm==1.0.31" "open_clip_torch==3.3.0"
  echo "$want" > "$stamp"
fi

cmd="${1:-test}"
shift || true
cd "$repo"
case "$cmd" in
  test)
    exec "$venv/bin/python" -m pytest "$@"
    ;;
  *)
    exec "$venv/bin/sparsewsi" "$cmd" "$@"
    ;;
esac
