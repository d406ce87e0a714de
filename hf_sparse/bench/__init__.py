"""Benchmarks: they measure and print (medians, ratios against the dense baseline run side by side); they never
assert timings."""
