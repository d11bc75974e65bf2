"""The package's version, in a module of its own so that any layer can name it without
importing the package (and so the whole API) first."""

__version__ = "0.1.0"
