#!/bin/sh
# p2prc container entry: make this container's own host keys, print the host key so the
# server can hand its fingerprint to the client, install the caller's key, then run sshd.
# A container of the host's warm pool (P2PRC_POOL=1, no key) waits, without sshd, until the
# host hands it out to its one caller: the host writes the caller's key and limits, one a
# line, to its standard input (the engine's attach; the container is made with stdin open);
# then it goes on as any other, sshd's input /dev/null.
# Everything it writes is under /root and /run, so the root file system may be read-only.
# The limits the host set (P2PRC_CPUS, P2PRC_MEMORY, OMP_NUM_THREADS, which nproc honours)
# reach every SSH session (sshd's SetEnv), not only this process.
set -eu
umask 077
mkdir -p /root/.ssh /run/sshd /run/p2prc-ssh
rm -f /run/p2prc-ssh/ssh_host_*
ssh-keygen -q -t ed25519 -N '' -f /run/p2prc-ssh/ssh_host_ed25519_key
echo "P2PRC-HOSTKEY $(cat /run/p2prc-ssh/ssh_host_ed25519_key.pub)"
if [ -z "${P2PRC_SSH_KEY:-}" ] && [ "${P2PRC_POOL:-}" = 1 ]; then
  echo "P2PRC-POOL-WAITING stdin"
  read -r P2PRC_SSH_KEY && read -r P2PRC_CPUS && read -r P2PRC_MEMORY \
    && read -r OMP_NUM_THREADS
  export P2PRC_CPUS P2PRC_MEMORY OMP_NUM_THREADS
fi
printf '%s\n' "${P2PRC_SSH_KEY:?no SSH key given}" > /root/.ssh/authorized_keys
unset P2PRC_SSH_KEY
# What pip installs for root (under /root/.local, /usr being read-only) is on the PATH.
session="PATH=/root/.local/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
for name in P2PRC_CPUS P2PRC_MEMORY OMP_NUM_THREADS; do
  value=$(printenv "$name" || true)
  case "$value" in
    ''|*[!0-9.]*) ;;  # unset, or not a number: not passed on
    *) session="$session $name=$value" ;;
  esac
done
exec /usr/sbin/sshd -D -e -f /etc/ssh/sshd_config_p2prc -o "SetEnv $session" < /dev/null
