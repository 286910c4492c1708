"""Measurements on sequences: accuracy per grammar level, theory, correlations, ..."""
