"""The ``p2prc`` command line: thin, it parses, calls the client or a service, and prints.

``base`` holds the group and what the commands share; each other module adds its commands
to the group when imported.
"""

from p2prc_core.cli import containers, local, peers, tasks, trust  # noqa: F401  (commands)
from p2prc_core.cli.base import Node, main

__all__ = ["Node", "main"]
