"""Command-line programs over the medmax library."""
