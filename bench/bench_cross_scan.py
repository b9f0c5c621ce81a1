"""Benchmarks of the cross_scan family (cross_scan, cross_merge, cross_selective_scan) against the torch reference and peers.

Run with pytest or as a script: see bench/_family.py.
"""
from _family import family_benchmark

test_cross_scan = family_benchmark("cross_scan", ["cross_scan", "cross_merge", "cross_selective_scan"], __name__)
