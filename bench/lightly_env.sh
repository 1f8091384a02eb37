#!/usr/bin/env bash
# Build the benchmark-only environment for bench/lightly_compare.py: stratavit (editable, from this
# checkout) + LightlySSL from PyPI, with the SAME torch/torchvision as the project's .venv.
#
#   bash bench/lightly_env.sh [VENV_DIR]        # default /work/bench-venv (outside the repo)
#   VENV_DIR/bin/python bench/lightly_compare.py --method both
#   VENV_DIR/bin/python -m pytest -q tests/test_lightly_reference.py   # LightlySSL losses as a second reference
#
# LightlySSL is never installed into the project's .venv: it is a benchmark reference only.
# torch and torchvision are pinned by a constraints file so that installing `lightly` (which
# depends on torch, torchvision and pytorch_lightning) cannot replace them.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${1:-/work/bench-venv}"
PYTHON="${PYTHON:-python3}"
TORCH_PIN="torch==2.14.1"
TORCHVISION_PIN="torchvision==0.29.1"
LIGHTLY_PIN="${LIGHTLY_PIN:-lightly==1.6.0}"

test -x "$VENV/bin/python" || "$PYTHON" -m venv "$VENV"
CONSTRAINTS="$VENV/bench-constraints.txt"
printf '%s\n%s\n' "$TORCH_PIN" "$TORCHVISION_PIN" >"$CONSTRAINTS"

PIP=("$VENV/bin/python" -m pip install --disable-pip-version-check)
# 1. the project's torch pair first (always pinned exactly, both together)
"${PIP[@]}" "$TORCH_PIN" "$TORCHVISION_PIN"
# 2. stratavit itself, editable, from this checkout
"${PIP[@]}" -c "$CONSTRAINTS" -e "$REPO"
# 3. LightlySSL from PyPI; the constraints keep torch/torchvision as they are
"${PIP[@]}" -c "$CONSTRAINTS" "$LIGHTLY_PIN" "pytest>=8" "pytest-timeout>=2.3"  # pytest: tests/test_lightly_reference.py

"$VENV/bin/python" - <<'EOF'
import lightly, timm, torch, torchvision
import stratavit
assert torch.__version__.startswith("2.14.1"), torch.__version__
assert torchvision.__version__.startswith("0.29.1"), torchvision.__version__
print(f"ok: torch {torch.__version__}, torchvision {torchvision.__version__}, timm {timm.__version__}, "
      f"lightly {lightly.__version__}, stratavit from {stratavit.__file__}")
EOF
