#!/bin/busybox sh
# /init of the migsec test guest (busybox only). It runs a workload whose state
# proves continuity across a save/restore from outside the guest:
#   MIGSEC-BOOT boot=<id>                      once per boot (never after a restore)
#   MIGSEC-COUNT <n>                           every 200 ms, n never restarts
#   MIGSEC-MEM boot=<id> seq=<k> sha256=<hex>  periodic re-check of the memory region
#   MIGSEC-DISK seq=<k> block=<b> sha256=<hex> a block written (and fsynced) to /dev/vda
#   MIGSEC-DISKCHECK boot=<id> blocks=<n> bad=<m> last=<k>  on request or periodically
# Parameters come from the kernel command line (migsec.seed=, migsec.mem=
# MiB, migsec.check= seconds between memory checks, migsec.disk= seconds between
# disk blocks, migsec.dirty= MiB of memory rewritten every 0.1 s, 0 = off, for
# live-migration benchmarks). Writing "verify" to the serial console asks for a disk check.
/bin/busybox --install -s /bin
export PATH=/bin

mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
# Keep kernel messages off the console so that workload lines are not split.
echo 1 > /proc/sys/kernel/printk

SEED=0; MEM_MIB=64; CHECK=5; DISK_EVERY=1; DIRTY=0
for arg in $(cat /proc/cmdline); do
  case "$arg" in
    migsec.seed=*) SEED=${arg#migsec.seed=} ;;
    migsec.mem=*) MEM_MIB=${arg#migsec.mem=} ;;
    migsec.check=*) CHECK=${arg#migsec.check=} ;;
    migsec.disk=*) DISK_EVERY=${arg#migsec.disk=} ;;
    migsec.dirty=*) DIRTY=${arg#migsec.dirty=} ;;
  esac
done
BOOT=$(head -c 8 /dev/urandom | sha256sum | head -c 16)
echo "MIGSEC-BOOT boot=$BOOT seed=$SEED mem=$MEM_MIB"

# The order matters: each module needs the ones before it.
for m in virtio_ring virtio virtio_pci_legacy_dev virtio_pci_modern_dev virtio_pci virtio_blk; do
  insmod /lib/modules/$m.ko || echo "MIGSEC-ERROR insmod $m"
done

# The counter starts first so that it is running while the region fills.
(
  n=0
  while :; do
    echo "MIGSEC-COUNT $n"
    n=$((n + 1))
    usleep 200000
  done
) &

# Memory region: MEM_MIB blocks of 1 MiB; each is a 64-byte line naming the seed
# and block, then 16383 copies of a line naming the seed, so the host can
# compute the expected SHA-256 (guest.expected_memory_sha256).
mkdir -p /mem
mount -t tmpfs -o size=$((MEM_MIB + 1))m tmpfs /mem
yes "$(printf '%-63s' "migsec-mem seed=$SEED")" | head -c $((1048576 - 64)) > /tmp/base
i=0
while [ $i -lt "$MEM_MIB" ]; do
  { printf '%-63s\n' "migsec-mem seed=$SEED block=$i"; cat /tmp/base; } >> /mem/region
  i=$((i + 1))
done
rm /tmp/base
MEM_SHA=$(sha256sum /mem/region | cut -d' ' -f1)
echo "MIGSEC-MEM-INIT boot=$BOOT mib=$MEM_MIB sha256=$MEM_SHA"

# Memory that keeps changing (a live migration must send it again and again).
# Non-zero bytes: QEMU sends zero pages as a flag, so rewriting zeros would cost it nothing.
if [ "$DIRTY" -gt 0 ]; then
  mkdir -p /dirty
  mount -t tmpfs -o size=$((2 * DIRTY + 1))m tmpfs /dirty
  head -c $((DIRTY * 1048576)) /dev/urandom > /dirty/src
  (
    while :; do
      dd if=/dirty/src of=/dirty/buf bs=1M count="$DIRTY" conv=notrunc 2>/dev/null
      usleep 100000
    done
  ) &
fi

# Disk blocks: 4096 bytes at block index seq (block 0 stays unused): 4032 bytes
# of payload (a header line + random bytes) then the payload's SHA-256 in hex.
BLK=/dev/vda
disk_check() {
  echo 3 > /proc/sys/vm/drop_caches  # read what is on the disk, not the page cache
  k=1; bad=0
  while :; do
    hdr=$(dd if=$BLK bs=4096 skip=$k count=1 2>/dev/null | head -c 10)
    [ "$hdr" = "MIGSECBLK " ] || break
    want=$(dd if=$BLK bs=4096 skip=$k count=1 2>/dev/null | tail -c 64)
    got=$(dd if=$BLK bs=4096 skip=$k count=1 2>/dev/null | head -c 4032 | sha256sum | head -c 64)
    [ "$want" = "$got" ] || bad=$((bad + 1))
    k=$((k + 1))
  done
  echo "MIGSEC-DISKCHECK boot=$BOOT blocks=$((k - 1)) bad=$bad last=$((k - 1))"
}
if [ -b $BLK ]; then
  (
    seq=1
    while :; do
      { printf 'MIGSECBLK seq=%d boot=%s\n' $seq $BOOT; head -c 4096 /dev/urandom; } | head -c 4032 > /tmp/blk
      sha=$(sha256sum /tmp/blk | head -c 64)
      printf '%s' "$sha" >> /tmp/blk
      dd if=/tmp/blk of=$BLK bs=4096 seek=$seq count=1 conv=notrunc,fsync 2>/dev/null
      echo "MIGSEC-DISK seq=$seq block=$seq sha256=$sha"
      seq=$((seq + 1))
      sleep "$DISK_EVERY"
    done
  ) &
  # Requests typed on the serial console (the host writes to the pty).
  (
    while read -r line; do
      case "$line" in
        verify*) disk_check ;;
      esac
    done < /dev/ttyS0
  ) &
else
  echo "MIGSEC-ERROR no $BLK"
fi

k=0
while :; do
  sleep "$CHECK"
  k=$((k + 1))
  sha=$(sha256sum /mem/region | cut -d' ' -f1)
  if [ "$sha" = "$MEM_SHA" ]; then st=ok; else st=BAD; fi
  echo "MIGSEC-MEM boot=$BOOT seq=$k sha256=$sha $st"
done
