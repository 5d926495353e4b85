#!/usr/bin/env bash
# Installs a container runtime the Agent's container tests can use on a machine without a
# Docker engine: Debian's podman (docker-compatible CLI) with runc, and a static busybox the
# tests turn into an image offline. Idempotent; never fails the caller: where it cannot
# install (not root, no apt), it says so and the container tests skip with that reason.
set -u

need=()
command -v podman >/dev/null 2>&1 || need+=(podman)
command -v runc >/dev/null 2>&1 || need+=(runc)
[ -x /bin/busybox ] || [ -x /usr/bin/busybox ] || need+=(busybox-static)

if [ ${#need[@]} -eq 0 ]; then
  echo "install_podman: podman, runc and busybox already present"
  exit 0
fi
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
  echo "install_podman: cannot install ${need[*]} (needs root and apt-get); container tests will skip"
  exit 0
fi
echo "install_podman: installing ${need[*]}"
export DEBIAN_FRONTEND=noninteractive
if ! { apt-get update -qq && apt-get install -y -qq "${need[@]}" >/dev/null; }; then
  echo "install_podman: apt-get failed; container tests will skip"
  exit 0
fi
echo "install_podman: done ($(podman --version 2>/dev/null))"
