"""medpipe stages (one module per DVC stage) and the packages they share; see README.md, "Layout"."""
