#!/usr/bin/env bash
# Bring a file larger than one transfer (the DALI wheel, ~199 MB, over a 64 MiB-per-call link) to a
# machine that cannot download: split it here, carry one chunk per call, join and verify it there,
# install the wheel into a target folder. docs/gpucheck.md gives the whole procedure (scripts/gpu_check.sh runs it);
# tests/test_dali_chunks.py rehearses every mode on small dummy files (the wheel itself: the whole DALI set).
#
#   scripts/dali_chunks.sh split   FILE|DIR OUTDIR [SIZE]  # OUTDIR/NAME.part00, .part01, ... (SIZE: 60M) + SHA256SUMS;
#                                                          # a DIR (the wheel and its dependencies) is tarred first
#   scripts/dali_chunks.sh join    CHUNKDIR OUTDIR         # cat the parts in order -> OUTDIR/NAME, then sha256sum -c
#   scripts/dali_chunks.sh verify  DIR                     # sha256sum -c DIR/SHA256SUMS (the joined file)
#   scripts/dali_chunks.sh install WHEEL|TAR TARGET        # pip install --no-deps --no-index --target TARGET (every
#                                                          # wheel of a TAR); then PYTHONPATH=TARGET:$PYTHONPATH python ...
set -euo pipefail

die() { echo "dali_chunks.sh: $*" >&2; exit 1; }
usage() { sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//'; exit "${1:-0}"; }

cmd=${1:-}; [ -n "$cmd" ] || usage 2
shift
case "$cmd" in
  split)
    [ $# -ge 2 ] || usage 2
    file=$1 out=$2 size=${3:-60M}
    mkdir -p "$out"
    if [ -d "$file" ]; then  # several wheels: one tar (wheels are already compressed)
      ls "$file"/*.whl >/dev/null 2>&1 || die "$file holds no .whl files"
      tar -C "$file" -cf "$out/$(basename "$file").tar" $(cd "$file" && ls *.whl)
      file="$out/$(basename "$file").tar"
      bundled=1
    fi
    [ -f "$file" ] || die "$file: no such file (download it first: pip download nvidia-dali-cuda130 -d DIR)"
    name=$(basename "$file")
    rm -f "$out/$name".part*
    split -b "$size" -d -a 2 "$file" "$out/$name.part"
    (cd "$(dirname "$file")" && sha256sum "$name") > "$out/SHA256SUMS"
    (cd "$out" && sha256sum "$name".part* > SHA256SUMS.parts)
    n=$(ls "$out/$name".part* | wc -l)
    echo "split $name ($(stat -c %s "$file") bytes) into $n parts of <= $size in $out; carry one part per call, plus SHA256SUMS*"
    [ -z "${bundled:-}" ] || rm "$file"
    ;;
  join)
    [ $# -ge 2 ] || usage 2
    dir=$1 out=$2
    [ -f "$dir/SHA256SUMS" ] || die "$dir/SHA256SUMS is missing: copy it with the parts"
    name=$(awk 'NR==1 {print $2}' "$dir/SHA256SUMS")
    parts=$(ls "$dir/$name".part* 2>/dev/null | sort) || true
    [ -n "$parts" ] || die "no $name.part* in $dir"
    if [ -f "$dir/SHA256SUMS.parts" ]; then  # name the missing or damaged chunk before joining
      expected=$(wc -l < "$dir/SHA256SUMS.parts")
      got=$(echo "$parts" | wc -l)
      [ "$got" -eq "$expected" ] || die "$got of $expected parts in $dir: copy the missing ones (see SHA256SUMS.parts)"
      (cd "$dir" && sha256sum --quiet -c SHA256SUMS.parts) || die "a part is damaged: copy it again"
    fi
    mkdir -p "$out"
    tmp="$out/.$name.joining"
    cat $parts > "$tmp"
    mv "$tmp" "$out/$name"
    [ "$(cd "$dir" && pwd)" = "$(cd "$out" && pwd)" ] || cp "$dir/SHA256SUMS" "$out/SHA256SUMS"
    (cd "$out" && sha256sum -c SHA256SUMS) || die "$out/$name does not match SHA256SUMS"
    echo "joined $(echo "$parts" | wc -l) parts into $out/$name"
    ;;
  verify)
    [ $# -ge 1 ] || usage 2
    (cd "$1" && sha256sum -c SHA256SUMS)
    ;;
  install)
    [ $# -ge 2 ] || usage 2
    wheel=$1 target=$2
    [ -f "$wheel" ] || die "$wheel: no such file (join the parts first)"
    py=${PYTHON:-python3}
    if [[ "$wheel" == *.tar ]]; then
      unpacked="${wheel%.tar}.wheels"
      rm -rf "$unpacked" && mkdir -p "$unpacked" && tar -C "$unpacked" -xf "$wheel"
      set -- "$unpacked"/*.whl
    else
      set -- "$wheel"
    fi
    "$py" -m pip install --quiet --no-deps --no-index --target "$target" "$@"
    echo "installed $# wheel(s) from $(basename "$wheel") into $target; use them with PYTHONPATH=$target:\$PYTHONPATH"
    ;;
  -h|--help|help) usage 0 ;;
  *) die "unknown mode '$cmd' (split | join | verify | install)" ;;
esac
