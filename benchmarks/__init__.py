"""Same-run benchmark scripts (python -m benchmarks.bench, .bench_overhead, .bench_scaling); not part of the dtp package."""
