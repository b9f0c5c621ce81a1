"""Benchmarks of the ssim family (ssim) against the torch reference and peers.

Run with pytest or as a script: see bench/_family.py.
"""
from _family import family_benchmark

test_ssim = family_benchmark("ssim", ["ssim"], __name__)
