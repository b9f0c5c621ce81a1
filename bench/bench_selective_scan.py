"""Benchmarks of the selective_scan family (selective_scan) against the torch reference and peers.

Run with pytest or as a script: see bench/_family.py.
"""
from _family import family_benchmark

test_selective_scan = family_benchmark("selective_scan", ["selective_scan"], __name__)
