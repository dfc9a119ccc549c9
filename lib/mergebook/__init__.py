"""mergebook: the shared library behind *Merging, Reproduced*."""

__version__ = "0.1.0"
