"""Benchmarks of the sam family (sam_map) against the torch reference and peers.

Run with pytest or as a script: see bench/_family.py.
"""
from _family import family_benchmark

test_sam = family_benchmark("sam", ["sam_map"], __name__)
