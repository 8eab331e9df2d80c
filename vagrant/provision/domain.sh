#!/usr/bin/env bash
# One cloud domain per hypervisor: certificate, trust store, peer, policies, an admin user,
# migsecd.toml, then migsecd under systemd. hv-a runs the lab CA and issues both domains'
# certificates; hv-b fetches its bundle from hv-a over ssh (a forced command, see Vagrantfile).
set -euo pipefail
: "${MIGSEC_DID:?}" "${MIGSEC_ADDRESS:?}" "${MIGSEC_PEER_DID:?}" "${MIGSEC_PEER_ADDRESS:?}" "${MIGSEC_CA_HOST:?}"
KEY=${MIGSEC_BOOTSTRAP_KEY:-/migsec/vagrant/.bootstrap/id_ed25519}
PASSWORD=${MIGSEC_LAB_PASSWORD:-migsec-lab-password}
install -d -m 0700 /etc/migsec/pki

if [ "$MIGSEC_ADDRESS" = "$MIGSEC_CA_HOST" ]; then
  [ -f /etc/migsec/ca/ca-key.pem ] || migsec ca init /etc/migsec/ca --name "migsec Vagrant lab CA"
  [ -f /etc/migsec/pki/domain-key.pem ] || migsec ca issue --ca /etc/migsec/ca --did "$MIGSEC_DID" --out /etc/migsec/pki
  bundle=/srv/migsec-bootstrap/peer
  install -d -m 0700 "$bundle"
  [ -f "$bundle/pki/domain-key.pem" ] || migsec ca issue --ca /etc/migsec/ca --did "$MIGSEC_PEER_DID" --out "$bundle/pki"
  cp /etc/migsec/pki/domain-cert.pem "$bundle/peer-cert.pem"
  install -d -m 0700 /root/.ssh
  line="command=\"tar -C $bundle -cf - .\",no-pty,no-port-forwarding,no-agent-forwarding,no-X11-forwarding $(cat "$KEY.pub")"
  grep -qxF "$line" /root/.ssh/authorized_keys 2>/dev/null || echo "$line" >> /root/.ssh/authorized_keys
  peer_cert="$bundle/pki/domain-cert.pem"
else
  install -m 0600 "$KEY" /root/.ssh-migsec-bootstrap
  tmp=$(mktemp -d)
  echo "domain: fetching this domain's certificate bundle from $MIGSEC_CA_HOST (waits for hv-a's provisioning)"
  for _ in $(seq 1 120); do
    if ssh -i /root/.ssh-migsec-bootstrap -o BatchMode=yes -o StrictHostKeyChecking=accept-new \
         -o ConnectTimeout=5 "root@$MIGSEC_CA_HOST" > "$tmp/bundle.tar" 2>/dev/null \
       && tar -C "$tmp" -xf "$tmp/bundle.tar" && [ -f "$tmp/pki/domain-key.pem" ]; then
      break
    fi
    sleep 10
  done
  [ -f "$tmp/pki/domain-key.pem" ] || { echo "domain: no bundle from $MIGSEC_CA_HOST after 20 minutes" >&2; exit 1; }
  install -m 0600 "$tmp/pki/domain-key.pem" /etc/migsec/pki/domain-key.pem
  install -m 0644 "$tmp/pki/domain-cert.pem" "$tmp/pki/ca-cert.pem" /etc/migsec/pki/
  install -m 0644 "$tmp/peer-cert.pem" /etc/migsec/pki/peer-cert.pem
  rm -rf "$tmp" /root/.ssh-migsec-bootstrap
  peer_cert=/etc/migsec/pki/peer-cert.pem
fi

cat > /etc/migsec/migsecd.toml <<TOML
# written by vagrant/provision/domain.sh
[domain]
id = "$MIGSEC_DID"
key = "/etc/migsec/pki/domain-key.pem"
certificate = "/etc/migsec/pki/domain-cert.pem"
trust = ["/etc/migsec/pki/ca-cert.pem"]

[paths]
state_dir = "/var/lib/migsec"

[listen]
peer = "$MIGSEC_ADDRESS:7443"

[storage]
image_dir = "/var/lib/libvirt/images"
map = { "/var/lib/libvirt/images" = "/var/lib/libvirt/images" }

[network]
map = { "default" = "default" }

[hooks]
allow_native_migration = false
TOML
chmod 0640 /etc/migsec/migsecd.toml

migsec peer add "$MIGSEC_PEER_DID" --address "$MIGSEC_PEER_ADDRESS:7443" --cert "$peer_cert" 2>/dev/null \
  || migsec peer list | grep -q "$MIGSEC_PEER_DID"
migsec policy init-defaults /etc/migsec/policies --trusted "$MIGSEC_PEER_DID" --accept-from "$MIGSEC_PEER_DID" --force
migsec user list | grep -qw alice || echo "$PASSWORD" | migsec user add alice --role migration-admin --password-stdin

systemctl enable migsecd
systemctl restart migsecd
# every FAIL stops the provisioning; WARN (e.g. the peer not provisioned yet) does not
migsec doctor
