#!/usr/bin/env bash
# Debian packages a migsec hypervisor needs (same list as scripts/setup.sh, minus test tools).
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends \
  python3 python3-venv python3-dev gcc pkg-config libvirt-dev \
  libvirt-daemon-system libvirt-clients qemu-system-x86 qemu-utils dnsmasq-base \
  linux-image-cloud-amd64 busybox-static cpio openssh-client rsync >/dev/null
# QEMU in the hypervisor VM uses KVM when nested virtualization reached it, TCG otherwise
if [ -e /dev/kvm ]; then echo "packages: /dev/kvm present (nested KVM)"; else echo "packages: no /dev/kvm: guests run under TCG"; fi
