"""Benchmarks, run through `dpslm-stream bench NAME`; they print numbers, they assert nothing."""
