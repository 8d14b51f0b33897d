"""Reproducible benchmark of the gateway against its floors, the seed's design and nginx.

Run ``python -m bench`` from the project root; see BENCHMARKS.md.
"""
