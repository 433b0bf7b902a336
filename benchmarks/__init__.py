"""Benchmarks of the fastadapters ops: fused vs reference vs the peer (PEFT, SDPA) vs the floor.

Run one with `python -m benchmarks.bench_lora --quick` from the repository root; each appends rows to
benchmarks/results/results.csv (see benchmarks/common.py for the columns).
"""
