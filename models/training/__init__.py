"""Training without Ray: the loop, the defaults, the precision checks and the local command line."""
