"""Benchmarks on real teachers and real test data (../shared). Never imported by the pipeline."""
