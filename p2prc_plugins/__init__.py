"""p2prc's built-in plugins. They load through the ``p2prc`` entry points like any other."""
