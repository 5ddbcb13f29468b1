"""p2prc from Python: the services the ``p2prc`` command uses, as objects.

>>> import p2prc
>>> node = p2prc.Node.open()                     # $P2PRC_HOME, or ~/.p2prc
>>> peer = node.peers(gpu=True)[0]               # the best peer with a free GPU
>>> box = node.touch(peer, gpu=1, ttl="1h")
>>> print(box.run("nvidia-smi -L").stdout)
>>> box.remove()

Errors are ``p2prc.P2PRCError`` (``PeerError`` where a peer cannot be reached or refuses;
``Refusal`` where what you asked is refused before anything is sent, as a malformed touch),
with the messages the command line prints. See docs/python.md.
"""

from p2prc.api import (
    CommandResult,
    Container,
    ExecResult,
    HostRun,
    Node,
    Peer,
    Peers,
    Run,
)
from p2prc_core import __version__
from p2prc_core.errors import P2PRCError, PeerError, PeerRefused, Refusal

__all__ = ["CommandResult", "Container", "ExecResult", "HostRun", "Node", "P2PRCError", "Peer",
           "PeerError", "PeerRefused", "Peers", "Refusal", "Run", "__version__"]
