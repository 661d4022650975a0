"""Not the engine: a toy transformer and its attention kernel, for the graph runtime's tests, its README
example and the graph benchmark (`tessera.testing.toy`)."""
