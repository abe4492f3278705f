"""moetrain: sparse Mixture-of-Experts Switch Transformers with pluggable router gradient estimators."""

__version__ = "0.1.0"
