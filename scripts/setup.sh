#!/usr/bin/env bash
# One-time, idempotent set-up: the system libraries FFCV compiles against, then a virtual
# environment (.venv) with this project installed. Safe to re-run; does nothing when up to date.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null || PYTHON=python3

# FFCV builds a C extension against libturbojpeg and OpenCV, found through pkg-config. The tests run a
# real SLURM cluster on this machine (slurm-wlm, munge; iproute2 for the two-node network namespaces);
# SETUP_SLURM=0 leaves those out, e.g. in a container image for a cluster that brings its own SLURM.
packages=(libturbojpeg0-dev libopencv-dev pkg-config)
[ "${SETUP_SLURM:-1}" = 1 ] && packages+=(slurm-wlm munge iproute2)
need_apt=()
for pkg in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || need_apt+=("$pkg")
done
if [ ${#need_apt[@]} -gt 0 ]; then
  echo "setup: installing system packages: ${need_apt[*]}"
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  log=$(mktemp)
  if ! { $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq \
        --no-install-recommends "${need_apt[@]}"; } >"$log" 2>&1; then
    tail -30 "$log"; echo "setup: apt-get failed (full log: $log)" >&2; exit 1
  fi
fi

# Reinstall the project only when its dependency list changed since the last set-up.
stamp="$VENV/.setup-stamp"
want=$(sha256sum pyproject.toml | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
# torch with its CUDA libraries is about 6.5 GiB installed, and pip unpacks wheels in TMPDIR first:
# say so up front rather than fail half-way through with pip's "No space left on device".
need_gib=8
for dir in "$VENV" "${TMPDIR:-/tmp}"; do
  free_gib=$(( $(df -Pk "$dir" | awk 'NR==2 {print $4}') / 1024 / 1024 ))
  if [ "$free_gib" -lt "$need_gib" ]; then
    echo "setup: only $free_gib GiB free where $dir lies; the Python packages need about $need_gib GiB." >&2
    echo "setup: free some space there, or point VENV (and TMPDIR) at a disk with room." >&2
    exit 1
  fi
done
echo "setup: installing Python packages into $VENV (a few minutes the first time)"
pip_q() { "$VENV/bin/python" -m pip install -q --disable-pip-version-check "$@" 2>&1 | grep -v "^WARNING: Location" || true; }
# torch first, from the pinned pair, so that nothing later pulls a different build.
pip_q "torch==2.14.1" "torchvision==0.29.1"
pip_q -e ".[dev]"
"$VENV/bin/python" -c "import ffcv, lightning, timm, torchvision" || { echo "setup: install incomplete" >&2; exit 1; }
echo "$want" > "$stamp"
echo "setup: environment ready in $VENV"
