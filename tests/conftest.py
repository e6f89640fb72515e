"""Shared pytest configuration. Fixtures that start real processes live in
``tests/*_harness.py`` modules and are imported by the tests that need them."""
