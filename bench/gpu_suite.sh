#!/usr/bin/env bash
# The GPU suite in one command (bench/gpu_suite.py says what it measures); results in $OUT/gpu_suite.{json,md}.
#
# On the device machine (carry the data, which ../shared is not beside the checkout there):
#   here, once:  bench/gpu_suite.sh --stage        # copies the shared tarballs (26 MB) into .device-data/ (git-ignored)
#   device run:  command "bash bench/gpu_suite.sh", carry [".device-data"], timeout_s 600
# Anywhere else: STRATAVIT_SHARED=/path/to/shared bash bench/gpu_suite.sh [gpu_suite.py options]
set -euo pipefail
cd "$(dirname "$0")/.."
SHARED="${STRATAVIT_SHARED:-../shared}"
if [[ "${1:-}" == "--stage" ]]; then
    mkdir -p .device-data
    cp "$SHARED"/datasets/cifar10/*.tar.gz "$SHARED"/datasets/weizmann-horses/*.tar.gz .device-data/
    du -sh .device-data
    exit 0
fi
SRC=.device-data
[[ -d "$SRC" ]] || SRC=""
DATA="${STRATAVIT_DATA:-/tmp/stratavit-suite-data}"
unpack() {  # archive target: the tests' layout (cifar10/train, cifar10/_test/test, weizmann-horses/train)
    [[ -e "$2/.complete" ]] && return
    mkdir -p "$2" && tar xzf "$1" -C "$2" && touch "$2/.complete"
}
find_archive() { if [[ -n "$SRC" ]]; then echo "$SRC/$1"; else echo "$SHARED/datasets/$2/$1"; fi; }
unpack "$(find_archive train.tar.gz cifar10)" "$DATA/cifar10"
unpack "$(find_archive test.tar.gz cifar10)" "$DATA/cifar10/_test"
unpack "$(find_archive weizmann-horses.tar.gz weizmann-horses)" "$DATA/weizmann-horses"
PY="${PYTHON:-$( [[ -x .venv/bin/python ]] && echo .venv/bin/python || echo python3 )}"
OUT="${OUT:-bench/out}"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
mkdir -p "$OUT"
"$PY" bench/gpu_suite.py --out "$OUT" --data-root "$DATA" "$@" 2>&1 | tee "$OUT/gpu_suite.log"
