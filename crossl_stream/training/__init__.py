"""Training and evaluation on real recordings: datasets, loops, the protocol, the report."""
