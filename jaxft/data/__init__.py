"""Data sets: SMS spam (classification), Alpaca-style instructions, NumPy batching."""
