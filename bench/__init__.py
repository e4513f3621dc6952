"""Benchmarks: each prints a table and writes JSON + Markdown under bench/results/."""
