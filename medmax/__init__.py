"""medmax: the library behind the early-fusion mixed-modal toolkit.

Importable with no side effects: no argument parsing and no printing here (``medmax/__main__.py``
is the one command-line entry point); everything logs through ``logging``.
"""

__version__ = "0.1.0"
