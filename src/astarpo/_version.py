"""The package's version, in a module of its own: the modules that record it (values files, bench reports) read it
from here, not from the package's ``__init__``, which imports them."""

__version__ = "0.1.0"
