"""Performance benchmarks: runnable scripts whose outputs are committed in results/perf.md."""
