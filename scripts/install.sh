#!/usr/bin/env bash
# One-shot, idempotent set-up for a fresh Debian machine: system libraries, the venv, CPU torch,
# the package with its test extras, and Pillow-SIMD in place of Pillow.
set -euo pipefail
VENV=${1:-.venv}
PYTHON=${PYTHON:-python3}
export PIP_DISABLE_PIP_VERSION_CHECK=1 NO_ALBUMENTATIONS_UPDATE=1

# 1. System libraries Pillow-SIMD compiles against (JPEG, zlib, WebP, TIFF, LittleCMS, FreeType).
need=()
for pkg in libjpeg62-turbo-dev zlib1g-dev libwebp-dev libtiff-dev liblcms2-dev libfreetype-dev; do
  dpkg -s "$pkg" >/dev/null 2>&1 || need+=("$pkg")
done
if [ ${#need[@]} -gt 0 ]; then
  echo "[install] system packages: ${need[*]}"
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq && $SUDO apt-get install -y -qq "${need[@]}" >/dev/null
fi

# 2. The venv. torch is pinned to the CPU build on this machine's wheel store; an unpinned torch
#    would pull a multi-GB CUDA build.
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
PIP="$VENV/bin/python -m pip"
# pip's output minus the "Location ... is ignored" lines some machines' pip configs print by the hundred;
# with pipefail the status is still pip's.
quiet() { "$@" 2>&1 | { grep -v "is ignored" || true; }; }
quiet $PIP install -q --upgrade pip setuptools wheel
quiet $PIP install -q torch==2.13.0
quiet $PIP install -q -e ".[test]"
# timm as a test client (its own resample_abs_pos_embed, checkpoint_filter_fn): pure Python, --no-deps so it
# pulls neither torchvision nor a CUDA torch.
quiet $PIP install -q --no-deps "timm>=1.0"

# 3. Pillow-SIMD: pillow and pillow-simd share PIL/, the last installed wins. Dependencies
#    (matplotlib, scikit-image, ...) pull plain pillow, so swap it out after every install.
if $PIP show pillow >/dev/null 2>&1 || ! $PIP show pillow-simd >/dev/null 2>&1; then
  CC_FLAGS="cc"
  grep -q avx2 /proc/cpuinfo && CC_FLAGS="cc -mavx2"
  echo "[install] building Pillow-SIMD with CC='$CC_FLAGS' (about 20 s)"
  $PIP uninstall -y -q pillow pillow-simd >/dev/null 2>&1 || true
  if ! CC="$CC_FLAGS" quiet $PIP install -q --no-cache-dir --no-binary pillow-simd "pillow-simd>=9.5"; then
    echo "[install] WARNING: Pillow-SIMD did not build (see above); falling back to plain Pillow (aimv2 doctor says which is live)"
    quiet $PIP install -q pillow
  fi
fi
"$VENV/bin/python" - <<'PY'
import PIL.features as f, importlib.metadata as md
owner = md.packages_distributions().get("PIL", ["?"])
missing = [c for c in ("jpg", "zlib", "webp", "libtiff", "littlecms2") if not f.check(c)]
print(f"[install] live PIL: {owner} {md.version(owner[0])}; missing codecs: {missing or 'none'}")
PY
