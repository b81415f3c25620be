"""dorakit's benchmarks: scripts in, JSON out (benchmarks/results/), README tables generated from it."""
