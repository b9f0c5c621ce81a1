"""Benchmarks of the select family (select_points, gather_points, scatter_points) against the torch reference and peers.

Run with pytest or as a script: see bench/_family.py.
"""
from _family import family_benchmark

test_select = family_benchmark("select", ["select_points", "gather_points", "scatter_points"], __name__)
