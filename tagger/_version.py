"""The tagger version, in a leaf module so that any part can import it without importing the package root."""

__version__ = "0.1.0"
