"""mergebook: the shared library behind *Merging, Reproduced*."""

__version__ = "0.2.0"
