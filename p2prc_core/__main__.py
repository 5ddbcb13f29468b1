"""``python -m p2prc_core``: the p2prc command."""

from p2prc_core.cli import main

main()
