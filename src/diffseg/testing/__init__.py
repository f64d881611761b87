"""Tiny randomly initialised models of the real diffusers architectures (`models`) and synthetic attention and images
with known segments (`synthetic`), for tests and benchmarks: no weights are downloaded."""
