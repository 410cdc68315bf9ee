"""The package version (a leaf: importable from anywhere without importing the package's API)."""
__version__ = "0.1.0"
