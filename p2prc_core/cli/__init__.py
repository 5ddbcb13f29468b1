"""The ``p2prc`` command line: thin, it parses, calls one object of the node's services, and
prints.

``base`` holds the group and what the commands share; each other module adds its commands
to the group when imported; ``original`` adds the original P2PRC's flags, last.
"""

from p2prc_core.cli import (  # noqa: F401  (commands)
    containers,
    jobs,
    local,
    original,  # noqa: F401  (the original flags, over the commands)
    peers,
    tasks,
    trust,
)
from p2prc_core.cli.base import CliContext, main

__all__ = ["CliContext", "main"]
