#!/bin/sh
# p2prc container entry: install the caller's key, make this container's own host keys,
# print the host key so the server can hand its fingerprint to the client, then run sshd.
# Everything it writes is under /root and /run, so the root file system may be read-only.
# The limits the host set (P2PRC_CPUS, P2PRC_MEMORY, OMP_NUM_THREADS, which nproc honours)
# reach every SSH session (sshd's SetEnv), not only this process.
set -eu
umask 077
mkdir -p /root/.ssh /run/sshd /run/p2prc-ssh
printf '%s\n' "${P2PRC_SSH_KEY:?no SSH key given}" > /root/.ssh/authorized_keys
unset P2PRC_SSH_KEY
rm -f /run/p2prc-ssh/ssh_host_*
ssh-keygen -q -t ed25519 -N '' -f /run/p2prc-ssh/ssh_host_ed25519_key
echo "P2PRC-HOSTKEY $(cat /run/p2prc-ssh/ssh_host_ed25519_key.pub)"
# What pip installs for root (under /root/.local, /usr being read-only) is on the PATH.
session="PATH=/root/.local/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
for name in P2PRC_CPUS P2PRC_MEMORY OMP_NUM_THREADS; do
  value=$(printenv "$name" || true)
  case "$value" in
    ''|*[!0-9.]*) ;;  # unset, or not a number: not passed on
    *) session="$session $name=$value" ;;
  esac
done
exec /usr/sbin/sshd -D -e -f /etc/ssh/sshd_config_p2prc -o "SetEnv $session"
