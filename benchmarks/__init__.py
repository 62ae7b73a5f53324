"""Benchmark scripts of optimum-rmtkd, and the data helpers they share (`assets`, `fashion_mnist`).

Run each script from the repository root as a module, e.g. `python -m benchmarks.quality --help`, so that it can
import its sibling helpers as `benchmarks.<name>`. Results are written under `benchmarks/results/`. Not part of the
installed package.
"""
