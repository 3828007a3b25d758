"""medmax: the library behind the early-fusion mixed-modal toolkit.

Importable with no side effects: no argument parsing and no printing here (``medmax/__main__.py``
is the one command-line entry point); everything logs through ``logging``. The only set-up is that the
module names from before ``medmax.data`` stay importable (``medmax._moved``).
"""

from ._moved import install as _install_moved_names

__version__ = "0.1.0"
_install_moved_names()
