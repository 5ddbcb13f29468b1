#!/bin/sh
# p2prc container entry: install the caller's key, make this container's own host keys,
# print the host key so the server can hand its fingerprint to the client, then run sshd.
# Everything it writes is under /root and /run, so the root file system may be read-only.
set -eu
umask 077
mkdir -p /root/.ssh /run/sshd /run/p2prc-ssh
printf '%s\n' "${P2PRC_SSH_KEY:?no SSH key given}" > /root/.ssh/authorized_keys
unset P2PRC_SSH_KEY
rm -f /run/p2prc-ssh/ssh_host_*
ssh-keygen -q -t ed25519 -N '' -f /run/p2prc-ssh/ssh_host_ed25519_key
echo "P2PRC-HOSTKEY $(cat /run/p2prc-ssh/ssh_host_ed25519_key.pub)"
exec /usr/sbin/sshd -D -e -f /etc/ssh/sshd_config_p2prc
