#!/usr/bin/env bash
# The GPU check's device calls, in one place (docs/gpucheck.md gives the sequence and its time budget).
# Here, on CPU, once:
#   scripts/gpu_check.sh prepare [--no-dali]  # .gpucheck/: payload/ (photos, manifest, tokenizer, <= 40 MB) and the
#                                             # wheels the GPU machine lacks (core: polars, pyarrow; dali: DALI and its
#                                             # dependencies) in 60 MiB parts; prints the device calls to make
#   scripts/gpu_check.sh calls                # print the device calls again (one line each: carry, command)
# There, one call per part, back to back on the same warm machine (it is given back ~30 s after a call):
#   scripts/gpu_check.sh receive              # keep the carried parts in /tmp/gpucheck (every call but the last)
#   scripts/gpu_check.sh run [BUDGET]         # the last call: receive, join + install what arrived whole, run the
#                                             # check with --data .gpucheck/payload (BUDGET seconds, default 540)
# Rehearsal on CPU (CI, tests/test_gpucheck.py): GPUCHECK_DRY=1 scripts/gpu_check.sh run  (adds --dry-run);
# GPUCHECK_PARTS / GPUCHECK_ROWS: --parts / --rows of the check.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
HERE=${GPUCHECK_HERE:-$ROOT/.gpucheck}   # ignored (.gitignore): it travels only when a call carries it
THERE=${GPUCHECK_TMP:-/tmp/gpucheck}
PY=${PYTHON:-python3}
CHUNKS="$ROOT/scripts/dali_chunks.sh"
PART_SIZE=${GPUCHECK_PART_SIZE:-60M}
PLATFORMS="--platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64"

die() { echo "gpu_check.sh: $*" >&2; exit 1; }
usage() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit "${1:-0}"; }

download() {  # DIR ARGS...: wheels for CPython 3.12 manylinux (what the GPU machine runs)
  local dir=$1; shift
  "$PY" -m pip download --quiet --only-binary=:all: --python-version 3.12 --implementation cp $PLATFORMS -d "$dir" "$@"
  rm -f "$dir"/numpy-*.whl   # the machine has its own numpy; a second one would shadow it
}

prepare() {
  local dali=1
  [ "${1:-}" = "--no-dali" ] && dali=0
  rm -rf "$HERE" && mkdir -p "$HERE"
  (cd "$ROOT" && "$PY" -m aimv2train.gpucheck --prepare "$HERE/payload")
  local v_polars v_arrow
  v_polars=$("$PY" -c "import polars; print(polars.__version__)")
  v_arrow=$("$PY" -c "import pyarrow; print(pyarrow.__version__)")
  local tmp
  tmp=$(mktemp -d)
  mkdir -p "$tmp/core" && download "$tmp/core" --no-deps "polars==$v_polars" "polars-runtime-32==$v_polars" "pyarrow==$v_arrow"
  bash "$CHUNKS" split "$tmp/core" "$HERE/core" "$PART_SIZE"
  if [ "$dali" = 1 ]; then
    mkdir -p "$tmp/dali" && download "$tmp/dali" nvidia-dali-cuda130==2.4.0
    bash "$CHUNKS" split "$tmp/dali" "$HERE/dali" "$PART_SIZE"
  fi
  rm -rf "$tmp"
  calls
}

calls() {  # one line per device call: the carry list, then the command
  [ -d "$HERE/payload" ] || die "no $HERE/payload: run scripts/gpu_check.sh prepare first"
  local parts=() b p
  for b in core dali; do
    [ -d "$HERE/$b" ] || continue
    for p in $(cd "$HERE/$b" && ls *.part[0-9]* | sort); do parts+=("$b/$p"); done
  done
  local n=${#parts[@]} payload last=0 alone=1
  payload=$(du -sb "$HERE/payload" | cut -f1)
  [ "$n" -gt 0 ] && last=$(stat -c %s "$HERE/${parts[n - 1]}")
  # 64 MiB a call, less ~4 MiB for the working tree: the payload rides with the last part only if both fit
  [ "$n" -gt 0 ] && [ $((last + payload)) -le $((60 * 1024 * 1024)) ] && alone=0
  local total=$((n + alone)) i=0 run="command: scripts/gpu_check.sh run 540  (timeout_s 595)"
  for p in "${parts[@]}"; do
    i=$((i + 1)); b=${p%%/*}
    local carry="[\".gpucheck/$p\", \".gpucheck/$b/SHA256SUMS\", \".gpucheck/$b/SHA256SUMS.parts\""
    if [ "$i" -lt "$n" ] || [ "$alone" = 1 ]; then
      echo "call $i/$total: carry $carry]  command: scripts/gpu_check.sh receive"
    else
      echo "call $i/$total: carry $carry, \".gpucheck/payload\"]  $run"
    fi
  done
  [ "$alone" = 0 ] || echo "call $total/$total: carry [\".gpucheck/payload\"]  $run"
}

receive() {  # whatever parts this call carried, into the folder that outlives the call on a warm machine
  local b
  for b in core dali; do
    [ -d "$HERE/$b" ] || continue
    mkdir -p "$THERE/$b" && cp "$HERE/$b"/* "$THERE/$b/"
    echo "received $(cd "$HERE/$b" && ls *.part[0-9]* 2>/dev/null | tr '\n' ' ')into $THERE/$b"
  done
}

install_bundles() {  # join + install every bundle whose parts all arrived; the others are named and left out
  local b tar
  for b in core dali; do
    [ -f "$THERE/$b/SHA256SUMS" ] || { echo "gpu_check.sh: no $b parts arrived: the check runs without them"; continue; }
    if ! bash "$CHUNKS" join "$THERE/$b" "$THERE/$b.joined"; then
      echo "gpu_check.sh: the $b bundle is incomplete (above): the check runs without it"
      continue
    fi
    tar=$(awk 'NR==1 {print $2}' "$THERE/$b/SHA256SUMS")
    PYTHON=$PY bash "$CHUNKS" install "$THERE/$b.joined/$tar" "$THERE/site"
  done
}

run() {
  local budget=${1:-540}
  receive
  install_bundles
  export PYTHONPATH="$THERE/site:$ROOT${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
  local out=${OUT:-$THERE/out}
  mkdir -p "$out" "$THERE/work"
  local dry=()
  [ -n "${GPUCHECK_DRY:-}" ] && dry=(--dry-run)
  local data=()
  [ -d "$HERE/payload" ] && data=(--data "$HERE/payload")
  cd "$ROOT"
  set +e
  "$PY" -m aimv2train.gpucheck "${dry[@]}" "${data[@]}" --workdir "$THERE/work" -o "$out/bench_gpu.json" \
      --budget "$budget" --rows "${GPUCHECK_ROWS:-fixed-flex-compiled}" --parts "${GPUCHECK_PARTS:-env,peak,decode,trainer,steps}" 2>&1 | tee "$out/gpu_check.log"
  local rc=${PIPESTATUS[0]}
  set -e
  echo "gpu_check.sh: the check exited $rc; figures in $out/bench_gpu.json"
  return "$rc"
}

cmd=${1:-}; [ -n "$cmd" ] || usage 2
shift
case "$cmd" in
  prepare) prepare "$@" ;;
  calls) calls ;;
  receive) receive ;;
  run) run "$@" ;;
  -h|--help|help) usage 0 ;;
  *) usage 2 ;;
esac
