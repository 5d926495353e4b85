#!/usr/bin/env bash
# Builds the emulated cloud VM image the instance emulators in tests/fakes boot (issue 11):
#
#   <cache>/rootfs          Debian 11 "bullseye" (minbase) + python3 (3.9) + python3-pip + CA certs:
#                           a cloud base image's system Python. No python3-venv, no `python`
#                           command, no torch, no cloud CLI.
#   <cache>/rootfs/opt/pytorch
#                           the image's separate PyTorch environment, as a Deep Learning image has
#                           one (DLAMI /opt/conda/envs/pytorch, GCP DLVM /opt/conda): a Debian 12
#                           minbase tree with its own python3.11, its own glibc and loader, and the
#                           CPU torch wheel from this machine's disk; `bin/python` enters it through
#                           that tree's own dynamic loader, so nothing of it leaks into the system
#                           Python 3.9 (bullseye's glibc 2.31 could not run bookworm's python3.11).
#   <cache>/wheels          a cp39 wheelhouse of the VM-side dependencies (the cloud store SDKs),
#                           served to the VMs as "the package index" in tests, and the cp311
#                           wheels of the controller host's control plane (`controller: cloud`).
#
# Cached and idempotent: a stamp keyed by this script's own hash; a second run returns at once.
# Never fails the caller: where it cannot build (not root, no network), it says so and the tests
# that need the image skip with that reason (tests/fakes/vm_image.py reads the stamp).
set -u
here=$(cd "$(dirname "$0")" && pwd)
PY=${1:-python3}
CACHE=${SPOTRUN_VM_CACHE:-/var/cache/spotrun-test}
recipe=$(sha256sum "$here/build_vm_image.sh" | cut -c1-12)
OUT="$CACHE/vm-$recipe"
MIRROR=${SPOTRUN_DEBIAN_MIRROR:-http://deb.debian.org/debian}

say() { echo "build_vm_image: $*"; }
if [ -f "$OUT/.ok" ]; then
  say "cached at $OUT"
  exit 0
fi
if [ "$(id -u)" != 0 ]; then
  say "not root: cannot debootstrap; the VM-image tests will skip"
  exit 0
fi
if ! command -v debootstrap >/dev/null 2>&1; then
  export DEBIAN_FRONTEND=noninteractive
  { apt-get update -qq && apt-get install -y -qq debootstrap >/dev/null; } || { say "cannot install debootstrap; the VM-image tests will skip"; exit 0; }
fi
start=$(date +%s)
work="$OUT.partial"
rm -rf "$CACHE"/vm-*.partial  # half-built ones (an older recipe's image stays: a test may be using it)
mkdir -p "$work"
fail() { say "$* (log: $work/build.log); the VM-image tests will skip"; exit 0; }

say "debootstrap bullseye (system python3 3.9) ..."
debootstrap --variant=minbase --include=python3,python3-pip,ca-certificates bullseye "$work/rootfs" "$MIRROR" \
  >"$work/build.log" 2>&1 || fail "debootstrap bullseye failed"
chroot "$work/rootfs" python3 -c 'import sys; assert sys.version_info[:2] == (3, 9), sys.version' \
  >>"$work/build.log" 2>&1 || fail "bullseye's python3 is not 3.9"
rm -rf "$work/rootfs/var/cache/apt/archives/"*.deb "$work/rootfs/var/lib/apt/lists/"*

say "debootstrap bookworm (the PyTorch environment's python3.11) ..."
env_root="$work/rootfs/opt/pytorch/root"
debootstrap --variant=minbase --include=python3 bookworm "$env_root" "$MIRROR" \
  >>"$work/build.log" 2>&1 || fail "debootstrap bookworm failed"
rm -rf "$env_root/var/cache/apt/archives/"*.deb "$env_root/var/lib/apt/lists/"*
say "torch (CPU) into the PyTorch environment ..."
"$PY" -m pip install -q --target "$env_root/usr/lib/python3/dist-packages" torch==2.13.0 numpy \
  >>"$work/build.log" 2>&1 || fail "pip install torch into the PyTorch environment failed"
mkdir -p "$work/rootfs/opt/pytorch/bin"
cat >"$work/rootfs/opt/pytorch/bin/python" <<'EOF'
#!/bin/sh
# The image's PyTorch environment (python 3.11 + torch), run through its own loader and libraries.
R=/opt/pytorch/root
export PYTHONHOME=$R/usr
exec "$R/usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2" --library-path "$R/usr/lib/x86_64-linux-gnu" \
  "$R/usr/bin/python3.11" "$@"
EOF
chmod +x "$work/rootfs/opt/pytorch/bin/python"
ln -sf python "$work/rootfs/opt/pytorch/bin/python3"
chroot "$work/rootfs" /opt/pytorch/bin/python -c 'import torch, sys; assert sys.version_info[:2] == (3, 11); print("torch", torch.__version__)' \
  >>"$work/build.log" 2>&1 || fail "the PyTorch environment does not import torch"

say "cp39 wheelhouse of the VM's dependencies ..."
# what spotrun/agent/package.py VM_PACKAGES names (the store SDKs), resolved by the image's own
# pip on its own Python 3.9 (environment markers, e.g. botocore's urllib3<1.27 on 3.9, follow it)
# (this machine's CA bundle: an intercepting proxy's CA is in the host's, not in bullseye's)
cp /etc/ssl/certs/ca-certificates.crt "$work/rootfs/tmp/host-ca.crt"
chroot "$work/rootfs" env -i PATH=/usr/bin:/bin HOME=/root python3 -m pip download -q --dest /tmp/wheels \
  --only-binary=:all: --cert /tmp/host-ca.crt --index-url https://pypi.org/simple \
  "boto3>=1.34" "google-cloud-storage>=2.16" "azure-storage-blob>=12.20" "azure-identity>=1.16" \
  >>"$work/build.log" 2>&1 || fail "pip download of the cp39 wheels failed"
mv "$work/rootfs/tmp/wheels" "$work/wheels"

say "cp311 wheelhouse of the controller host's dependencies ..."
# `controller: cloud` (spotrun/control/durable/host.py) runs spotrun's whole control plane on the
# image's Python >= 3.11 (here /opt/pytorch/bin/python): spotrun's own requirements + each cloud's
# extra, plus a pip wheel (that python has no pip: vmboot runs pip from the wheel). Downloaded by
# this machine's pip for CPython 3.11 on manylinux (the PyTorch environment is bookworm, glibc 2.36).
"$PY" -m pip download -q --isolated --dest "$work/wheels" --only-binary=:all: \
  --cert /etc/ssl/certs/ca-certificates.crt --index-url https://pypi.org/simple \
  --python-version 3.11 --implementation cp --abi cp311 \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  "typer>=0.12" "rich>=13" "pyyaml>=6" "pydantic>=2.6" "platformdirs>=4" "pathspec>=0.12" "pip" \
  "boto3>=1.34" "google-cloud-compute>=1.20" "google-cloud-storage>=2.16" "google-cloud-secret-manager>=2.20" \
  "azure-mgmt-compute>=33" "azure-mgmt-network>=25" "azure-identity>=1.16" "azure-storage-blob>=12.20" \
  "azure-keyvault-secrets>=4.8" \
  >>"$work/build.log" 2>&1 || fail "pip download of the cp311 controller wheels failed"
rm -f "$work/rootfs/tmp/host-ca.crt"
rm -rf "$work/rootfs/root/.cache"

rm -rf "$OUT"
mv "$work" "$OUT"
echo "built in $(( $(date +%s) - start ))s" >"$OUT/.ok"
say "built $OUT in $(( $(date +%s) - start ))s"
