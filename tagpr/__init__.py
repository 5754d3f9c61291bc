"""TagPR: personalization reasoning with tagged steps (arXiv 2509.23140), from scratch."""

__version__ = "0.1.0"
