"""migsecd: the per-host daemon (AS, AZ, inter-domain endpoint, VMM agent)."""
