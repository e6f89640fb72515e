"""Pieces the benches share (not a bench itself: ``bench/*.py`` are the benches)."""
