"""The generation core every backend shares: decoder interface, scheduler, continuation, sampler,
text, parameters and constraints. It imports no backend."""
