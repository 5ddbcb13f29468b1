#!/bin/sh
# p2prc container entry: install the caller's key, make this container's own host keys,
# print the host key so the server can hand its fingerprint to the client, then run sshd.
set -eu
umask 077
mkdir -p /root/.ssh /run/sshd
printf '%s\n' "${P2PRC_SSH_KEY:?no SSH key given}" > /root/.ssh/authorized_keys
unset P2PRC_SSH_KEY
rm -f /etc/ssh/ssh_host_*
ssh-keygen -q -t ed25519 -N '' -f /etc/ssh/ssh_host_ed25519_key
echo "P2PRC-HOSTKEY $(cat /etc/ssh/ssh_host_ed25519_key.pub)"
exec /usr/sbin/sshd -D -e -f /etc/ssh/sshd_config_p2prc
