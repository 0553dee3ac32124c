#!/bin/busybox sh
# PID 1 of a Devyard microVM until the guest agent takes over: loads the virtio modules (the cloud
# kernel has them as modules and the package ships no modules.dep, so the order is fixed here),
# mounts the box's disks the way the sandbox lays out a box (image root writable through its qcow2
# overlay, the workspace volume at /workspace and /root, the tools read-only at /.devyard),
# configures the network from the kernel command line and execs the guest agent.
# Disks are found by their virtio serial (root, volume, tools), never by probe order.
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
fail() { echo "devyard-init: $*" > /dev/ttyS0; sleep 1; poweroff -f; }
for m in virtio_ring virtio virtio_mmio virtio_blk failover net_failover virtio_net virtio_console; do
  insmod /lib/modules/$m.ko || fail "insmod $m"
done
for arg in $(cat /proc/cmdline); do
  case "$arg" in
    devyard.ip=*) IP="${arg#*=}" ;;
    devyard.gw=*) GW="${arg#*=}" ;;
    devyard.hostname=*) HOST="${arg#*=}" ;;
    devyard.dns=*) DNS="${arg#*=}" ;;
  esac
done
disk() { # prints /dev/vdX of the disk whose virtio serial is $1
  for d in /sys/block/vd*; do [ "$(cat $d/serial 2>/dev/null)" = "$1" ] && { echo /dev/${d##*/}; return 0; }; done
  return 1
}
i=0
while ! disk root >/dev/null || ! disk volume >/dev/null || ! disk tools >/dev/null; do
  i=$((i+1)); [ $i -gt 500 ] && fail "disks did not appear"; usleep 10000
done
mount -t ext4 -o noatime "$(disk root)" /newroot || fail "mount root"
mount -t ext4 -o noatime "$(disk volume)" /mnt/volume || fail "mount volume"
mkdir -p /mnt/volume/workspace /mnt/volume/home /newroot/workspace /newroot/root /newroot/.devyard /newroot/proc /newroot/sys /newroot/dev /newroot/run /newroot/tmp /newroot/etc
chmod 0700 /mnt/volume/home
mount -t ext4 -o ro "$(disk tools)" /newroot/.devyard || fail "mount tools"
mount --bind /mnt/volume/workspace /newroot/workspace
mount --bind /mnt/volume/home /newroot/root
mount -t proc proc /newroot/proc
mount -t sysfs sysfs /newroot/sys
mkdir -p /dev/pts /dev/shm
mount -t devpts -o newinstance,ptmxmode=0666,mode=0620,gid=5 devpts /dev/pts
ln -sf pts/ptmx /dev/ptmx 2>/dev/null
mount -t tmpfs -o mode=1777,nosuid,nodev shm /dev/shm
mount --rbind /dev /newroot/dev
mount -t tmpfs -o mode=0755,nosuid,nodev tmpfs /newroot/run
mkdir -p /newroot/run/devyard/secrets
mount -t tmpfs -o mode=0755,nosuid,nodev,noexec,size=4m secrets /newroot/run/devyard/secrets
hostname "${HOST:-box}"
echo "${HOST:-box}" > /newroot/etc/hostname
printf '127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n%s\t%s\n' "${IP%/*}" "${HOST:-box}" > /newroot/etc/hosts
[ -n "$DNS" ] && echo "$DNS" | tr ',' '\n' | sed 's/^/nameserver /' > /newroot/etc/resolv.conf
ip link set lo up
if [ -n "$IP" ]; then
  ip addr add "$IP" dev eth0 && ip link set eth0 up || fail "network"
  [ -n "$GW" ] && ip route add default via "$GW"
fi
PORT=
for p in /sys/class/virtio-ports/*; do [ "$(cat $p/name 2>/dev/null)" = devyard.agent ] && PORT=/dev/${p##*/}; done
[ -n "$PORT" ] || fail "no agent port"
exec /bin/devyard-guest-agent --port "$PORT" --root /newroot
