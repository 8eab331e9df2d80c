#!/usr/bin/env bash
# Installs everything migsec needs on a Debian 12 host, idempotently:
# apt packages (libvirt, QEMU, the test guest's kernel and busybox, tools),
# then a virtualenv in .venv with migsec and its test extra.
# Run as root. Safe to run again: it only installs what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(
  # build libvirt-python and a venv
  python3 python3-venv python3-dev gcc pkg-config libvirt-dev
  # the hypervisor
  libvirt-daemon-system libvirt-clients qemu-system-x86 qemu-utils dnsmasq-base
  # the test guest (no download beyond the package registries)
  linux-image-cloud-amd64 busybox-static cpio
  # the lab, baselines and operator checks
  iproute2 procps psmisc openssh-client openssh-server rsync systemd
  # `vagrant validate` of vagrant/ (offline; about 25 s to install)
  vagrant vagrant-libvirt
)

if [ "$(id -u)" -ne 0 ]; then
  echo "setup.sh: run as root (it installs apt packages and manages network namespaces)" >&2
  exit 1
fi

missing=()
for p in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "setup.sh: installing apt packages: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

PY=${MIGSEC_PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
stamp=.venv/.migsec-installed
if [ ! -f "$stamp" ] || [ setup.cfg -nt "$stamp" ]; then
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -e '.[test]'
  touch "$stamp"
fi
# The lab's test guest (Debian kernel + busybox initramfs), built once into /var/cache/migsec/guest.
.venv/bin/migsec lab build-guest >/dev/null
echo "setup.sh: ready ($(.venv/bin/python --version), migsec at .venv/bin/migsec)"
