"""altpo-fast benchmarks: kernel microbenchmarks, the AltPO step benchmark, the GPU suite.

Run from the repository root, either as modules (``python -m benchmarks.step --quick``) or as
scripts (``python -m benchmarks.step --quick``). See benchmarks/README.md.
"""
