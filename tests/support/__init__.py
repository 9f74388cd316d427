"""Test support: mock guest drivers, device harnesses and the nested-host fixture."""
