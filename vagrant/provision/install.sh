#!/usr/bin/env bash
# Install migsec from the rsync'd checkout (/migsec) into /opt/migsec and put its host files
# in place with `migsec install`; idempotent.
set -euo pipefail
if [ ! -x /opt/migsec/bin/python ]; then
  python3 -m venv /opt/migsec
fi
/opt/migsec/bin/pip install -q --upgrade pip
/opt/migsec/bin/pip install -q /migsec
ln -sf /opt/migsec/bin/migsec /usr/local/bin/migsec
/opt/migsec/bin/migsec install --prefix /opt/migsec --source /migsec
systemctl daemon-reload
systemd-tmpfiles --create /etc/tmpfiles.d/migsec.conf
# libvirtd looks for hooks only when it starts
systemctl restart libvirtd
