"""One op per module: Triton kernel(s), launcher, memory-lean torch path and the public functional."""
