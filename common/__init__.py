"""Pieces every other package may import: nothing here imports from the rest of the project."""
