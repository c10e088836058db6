"""Distributed training of Generative Max-Mahalanobis Classifiers (GMMC)."""

__version__ = "0.1.0"
