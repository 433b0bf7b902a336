"""Benchmarks of fastadapters: fused vs reference vs the peer (HF PEFT, SDPA, FlexAttention) vs the floor.

    python -m benchmarks --preset quick [--ops lora,model] [--out DIR] [--plots DIR]   (the driver: run.py)
    python -m benchmarks.plot results.csv --out plots/                                  (PNG charts)
    python -m benchmarks.readme_table                                                   (README Performance block)
    pytest benchmarks/ --benchmark-only                                                 (CPU micro-benchmarks)

Rows go to benchmarks/results/results.csv by default; the columns are common.COLUMNS.
"""
