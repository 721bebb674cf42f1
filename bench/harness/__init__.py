"""Pieces of bench/speed.py and bench/scaling.py (run them as scripts; bench/ is on sys.path then)."""
