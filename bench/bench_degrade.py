"""Benchmarks of the degrade family (spectral_response, spatial_degrade) against the torch reference and peers.

Run with pytest or as a script: see bench/_family.py.
"""
from _family import family_benchmark

test_degrade = family_benchmark("degrade", ["spectral_response", "spatial_degrade"], __name__)
