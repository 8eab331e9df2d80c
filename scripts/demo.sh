#!/usr/bin/env bash
# migsec in one command, as root on a fresh Debian 12 machine:
#
#   bash scripts/demo.sh          install, bring up the two-host lab with a CA, two domains
#                                 (cloud-a.example on host a, cloud-b.example on host b), users,
#                                 peers and default policies, start both migsecd, and migrate the
#                                 running guest vm1 from a to b with the progress bar, then
#                                 back from b to a live (--live: libvirt's live migration
#                                 through migsec's session)
#   bash scripts/demo.sh --down   stop both daemons and remove the lab
#
# Idempotent: a second run reuses what exists; if vm1 already runs on b it is first moved back
# to a (with migsec too), so every run shows the move a -> b (cold) and b -> a (live).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

export MIGSEC_LAB_DIR=${MIGSEC_LAB_DIR:-/var/lib/migsec/lab}
LAB=$MIGSEC_LAB_DIR
GUEST=${MIGSEC_DEMO_GUEST:-vm1}
PORT=7443
declare -A DID=([a]=cloud-a.example [b]=cloud-b.example)
declare -A ADDR=([a]=198.18.0.1 [b]=198.18.0.2)

if [ -t 1 ]; then
  step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
else
  step() { printf '\n== %s\n' "$*"; }
fi
die() { echo "demo.sh: $*" >&2; exit 1; }

[ "$(id -u)" -eq 0 ] || die "run as root (the lab uses network namespaces, mounts and libvirtd)"

MIGSEC=$ROOT/.venv/bin/migsec
MIGSECD=$ROOT/.venv/bin/migsecd

conf() { echo "$LAB/$1/migsec/migsecd.toml"; }
uri() { echo "qemu+unix:///system?socket=$LAB/$1/run/libvirt/libvirt-sock"; }
state() {
  local s
  s=$(virsh -q -c "$(uri "$1")" domstate "$GUEST" 2>/dev/null | awk 'NR == 1' || true)
  echo "${s:-absent}"
}
inside() {  # run a command inside lab host $1 (its network + mount namespaces)
  local h=$1; shift
  local prefix
  prefix=$("$ROOT/.venv/bin/python" -c 'from migsec.lab import Lab; print(Lab.load().prefix)')
  # exec: when run in the background, $! is then the pid of the command itself
  exec nsenter --net="/run/netns/$prefix-$h" --mount="$LAB/ns/$h.mnt" -- "$@"
}

stop_daemons() {
  local h pid
  for h in a b; do
    pid=$(cat "$LAB/$h/migsec/migsecd.pid" 2>/dev/null || true)
    if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then
      kill "$pid"
      for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    fi
    rm -f "$LAB/$h/migsec/migsecd.pid"
  done
}

if [ "${1:-}" = "--down" ]; then
  if [ -x "$MIGSEC" ]; then
    stop_daemons
    "$MIGSEC" lab down
  fi
  echo "demo.sh: lab removed"
  exit 0
fi
[ $# -eq 0 ] || die "usage: bash scripts/demo.sh [--down]"

step "1. Install what migsec needs (apt packages, .venv)"
bash scripts/setup.sh

step "2. The lab: hosts a and b, each with its own libvirtd, in network + mount namespaces"
"$MIGSEC" lab up --no-guest

step "3. A CA, a certificate per domain, users, peers and the default XACML policies"
if [ ! -f "$LAB/demo-password" ]; then
  (umask 077; "$ROOT/.venv/bin/python" -c 'import secrets; print(secrets.token_urlsafe(18))' > "$LAB/demo-password")
fi
PASSWORD=$(cat "$LAB/demo-password")
[ -f "$LAB/ca/ca-cert.pem" ] || "$MIGSEC" ca init "$LAB/ca" --name "migsec demo CA"
for h in a b; do
  base=$LAB/$h/migsec
  other=$([ "$h" = a ] && echo b || echo a)
  mkdir -p "$base"
  [ -f "$base/pki/domain-cert.pem" ] || "$MIGSEC" ca issue --did "${DID[$h]}" --out "$base/pki" --ca "$LAB/ca"
  cat > "$base/migsecd.toml" <<EOF
# migsecd of ${DID[$h]} on lab host $h (written by scripts/demo.sh)
[domain]
id = "${DID[$h]}"
key = "pki/domain-key.pem"
certificate = "pki/domain-cert.pem"
trust = ["pki/ca-cert.pem"]

[paths]
state_dir = "state"
users = "users.json"
peers = "peers.json"
policy_dir = "policies"
sk3 = "sk3.key"

[listen]
peer = "${ADDR[$h]}:$PORT"
control_socket = "$base/migsecd.sock"
socket_mode = 0o660

[libvirt]
uri = "qemu:///system"

[storage]
image_dir = "$LAB/$h/images"
map = { "$LAB/$other/images" = "$LAB/$h/images" }
boot_dirs = ["${MIGSEC_GUEST_CACHE:-/var/cache/migsec/guest}"]   # the lab guest's kernel + initramfs (live moves)
EOF
  "$MIGSEC" policy init-defaults "$base/policies" --force --trusted "${DID[$other]}" >/dev/null
  "$MIGSEC" user list --config "$base/migsecd.toml" | grep -q '^admin\b' ||
    "$MIGSEC" user add admin --role migration-admin --password-stdin --config "$base/migsecd.toml" <<< "$PASSWORD"
done
for h in a b; do
  other=$([ "$h" = a ] && echo b || echo a)
  "$MIGSEC" peer list --config "$(conf "$h")" | grep -q "${DID[$other]}" ||
    "$MIGSEC" peer add "${DID[$other]}" --address "${ADDR[$other]}:$PORT" \
      --cert "$LAB/$other/migsec/pki/domain-cert.pem" --config "$(conf "$h")"
done
echo "CA $LAB/ca; domains ${DID[a]} (host a, ${ADDR[a]}) and ${DID[b]} (host b, ${ADDR[b]});"
echo "user 'admin' (role migration-admin) in both; password in $LAB/demo-password"

step "4. Start migsecd inside each host (AS, AZ, peer endpoint on :$PORT, VMM agent)"
stop_daemons  # a re-run starts them with the current code and configuration
for h in a b; do
  base=$LAB/$h/migsec
  (inside "$h" "$MIGSECD" --config "$base/migsecd.toml") >>"$base/migsecd.log" 2>&1 &
  echo $! > "$base/migsecd.pid"
done
for h in a b; do
  for _ in $(seq 100); do
    (inside "$h" "$MIGSEC" jobs --config "$(conf "$h")") >/dev/null 2>&1 && break
    sleep 0.2
  done
  (inside "$h" "$MIGSEC" jobs --config "$(conf "$h")") >/dev/null || die "migsecd on $h did not start; see $LAB/$h/migsec/migsecd.log"
  echo "migsecd of ${DID[$h]} is up (log: $LAB/$h/migsec/migsecd.log)"
done

step "5. The guest $GUEST running on host a"
if [ "$(state b)" = "running" ]; then
  echo "$GUEST runs on b from an earlier run: moving it back to a first"
  (inside b "$MIGSEC" migrate "$GUEST" "migsec://${ADDR[a]}:$PORT" --persistent --undefinesource \
    --user admin --password-stdin --config "$(conf b)") <<< "$PASSWORD"
fi
if [ "$(state a)" != "running" ]; then
  "$MIGSEC" lab up --guest "$GUEST" --guest-memory 256M --disk 1G >/dev/null
fi
sleep 2
echo "console of $GUEST on a (the counter it prints every 200 ms):"
"$MIGSEC" lab console a "$GUEST" --log | grep -a 'MIGSEC-COUNT' | tail -n 3
before=$("$MIGSEC" lab console a "$GUEST" --log | grep -a 'MIGSEC-COUNT' | tail -n 1 | awk '{print $2}')
console_b=$LAB/b/log/qemu/$GUEST-console.log  # appended to across runs: show only what follows
seen_b=$( (cat "$console_b" 2>/dev/null || true) | wc -l)

step "6. migsec migrate $GUEST migsec://${ADDR[b]}:$PORT --verbose (run on host a)"
(inside a "$MIGSEC" migrate "$GUEST" "migsec://${ADDR[b]}:$PORT" --verbose --persistent --undefinesource \
  --user admin --password-stdin --config "$(conf a)") <<< "$PASSWORD"

step "7. The guest continues on b"
sleep 3
echo "host a: $GUEST is $(state a)"; echo "host b: $GUEST is $(state b)"
echo "console of $GUEST on b: the counter goes on from $before (last value seen on a before the move), no reboot,"
echo "the memory region still has its checksum (MIGSEC-MEM ... ok):"
tail -n +"$((seen_b + 1))" "$console_b" | grep -a 'MIGSEC-COUNT' | awk 'NR <= 2'
echo "..."
# the guest re-hashes its region every 5 s: wait for the first check made on b (counter lines,
# every 200 ms, would crowd it out of a plain tail)
for _ in $(seq 1 30); do
  tail -n +"$((seen_b + 1))" "$console_b" | grep -aq 'MIGSEC-MEM ' && break
  sleep 0.5
done
tail -n +"$((seen_b + 1))" "$console_b" | grep -a 'MIGSEC-COUNT' | tail -n 1
tail -n +"$((seen_b + 1))" "$console_b" | grep -a 'MIGSEC-MEM \|MIGSEC-BOOT' | tail -n 2 \
  | grep -a . || echo "(no memory check on b within 15 s: see $console_b)"

step "8. Live: migsec migrate $GUEST migsec://${ADDR[a]}:$PORT --live --verbose (run on host b)"
echo "libvirt moves the running guest back peer to peer; its RPC, QEMU's stream and the NBD disk"
echo "mirror cross migsec's encrypted session, through b's filtering libvirt RPC proxy. libvirt's Finish"
echo "leaves the guest paused on a; a resumes it only with b's signed commit (the downtime shown is"
echo "libvirt's figure plus that wait):"
console_a=$LAB/a/log/qemu/$GUEST-console.log
seen_a=$( (cat "$console_a" 2>/dev/null || true) | wc -l)
before=$(tail -n +"$((seen_b + 1))" "$console_b" | grep -a 'MIGSEC-COUNT' | tail -n 1 | awk '{print $2}')
(inside b "$MIGSEC" migrate "$GUEST" "migsec://${ADDR[a]}:$PORT" --live --verbose --persistent --undefinesource \
  --user admin --password-stdin --config "$(conf b)") <<< "$PASSWORD"
sleep 3
echo "host a: $GUEST is $(state a)"; echo "host b: $GUEST is $(state b)"
echo "console of $GUEST on a: the counter goes on from $before (it kept counting while it moved), same boot (no MIGSEC-BOOT line):"
tail -n +"$((seen_a + 1))" "$console_a" | grep -a 'MIGSEC-COUNT\|MIGSEC-MEM \|MIGSEC-BOOT' | awk 'NR <= 2'
echo "..."
tail -n +"$((seen_a + 1))" "$console_a" | grep -a 'MIGSEC-COUNT\|MIGSEC-MEM \|MIGSEC-BOOT' | tail -n 2

step "9. migsec audit verify, on both sides"
for h in a b; do
  echo "${DID[$h]}:"
  "$MIGSEC" audit --config "$(conf "$h")" verify
done

step "10. migsec jobs on host a"
(inside a "$MIGSEC" jobs --config "$(conf a)")

cat <<EOF

The lab stays up. Look around:
  $MIGSEC lab status
  $MIGSEC lab console b $GUEST            (Ctrl-] detaches)
  $MIGSEC audit --config $(conf b) show
Run the demo again to move $GUEST back and forth (cold, then live); tear everything down with:
  bash scripts/demo.sh --down
EOF
