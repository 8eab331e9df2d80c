#!/usr/bin/env bash
# Run on hv-a: move vm1 to hv-b with migsec, then show the audit trail.
#   vagrant ssh hv-a -c 'sudo /migsec/vagrant/provision/migrate-demo.sh'
set -euo pipefail
PASSWORD=${MIGSEC_LAB_PASSWORD:-migsec-lab-password}
echo "== before: counter $(grep -o 'MIGSEC-COUNT [0-9]*' /var/log/libvirt/qemu/vm1-console.log | tail -1)"
echo "$PASSWORD" | migsec migrate vm1 migsec://cloud-b.example --user alice --password-stdin --persistent --undefinesource --verbose
echo "== on hv-b now:   vagrant ssh hv-b -c 'sudo virsh list; sudo migsec audit show'"
migsec audit show | tail -n 20
migsec audit verify
