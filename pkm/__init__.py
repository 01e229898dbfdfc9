"""The `pkm` command: the top of the package graph. Nothing imports it; it imports each package's cli."""
