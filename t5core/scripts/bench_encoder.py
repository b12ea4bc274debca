"""Benchmark t5core against transformers (the same as `python -m t5core bench`; see t5core/bench.py).

  python t5core/scripts/bench_encoder.py --help
"""
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a file from a checkout: make `t5core` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from t5core.bench import main

if __name__ == "__main__":
    main()
