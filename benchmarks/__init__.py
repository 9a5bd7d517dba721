"""Benchmarks of promptkd against TRL's GKDTrainer: step throughput, overhead, evaluation and loss memory.

Run `python -m benchmarks.bench --help`; docs/benchmarks.md has the commands and the recorded results.
"""
