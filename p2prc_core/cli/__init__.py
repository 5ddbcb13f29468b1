"""The ``p2prc`` command line: thin, it parses, calls one object of the node's services, and
prints.

``base`` holds the group and what the commands share; the group imports each other module
(which adds its commands to the group) only when one of its commands runs; ``original`` adds
the original P2PRC's flags, which stand for some of those commands.
"""

from p2prc_core.cli import original  # noqa: F401  (the original flags, over the commands)
from p2prc_core.cli.base import CliContext, main

__all__ = ["CliContext", "main"]
