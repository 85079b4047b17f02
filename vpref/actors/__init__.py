"""Ray actors: generators, judges and their pool, the pair writer."""
