"""The package's version: a leaf, so that a run record can name it without importing the package."""

__version__ = "0.3.0"
