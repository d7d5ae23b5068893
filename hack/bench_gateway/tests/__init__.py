"""Unit tests of the benchmark's pure parts: `python3 -m unittest discover -s hack/bench_gateway -t .`
from the repository root (standard library only; nothing is started)."""
