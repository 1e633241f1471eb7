"""Test and benchmark support shared by tests/ and bench/ (not used in production)."""
