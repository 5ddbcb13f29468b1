"""Rank peers with free GPUs first: each GPU a peer says no container holds now is worth
200 points of score.

The built-in score gives at most about 100 points for a near peer, so a reachable peer with
a GPU outranks any peer without one; an unreachable peer still ranks last.
"""

from p2prc_core import hookimpl

POINTS_PER_GPU = 200.0
MAX_GPUS_COUNTED = 8


@hookimpl
def p2prc_score_peer(peer):
    if not peer.reachable:
        return None
    return POINTS_PER_GPU * min(peer.free_gpus, MAX_GPUS_COUNTED)
