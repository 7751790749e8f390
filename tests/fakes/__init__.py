"""Test doubles that speak real protocols (HTTP on loopback), shared by all test levels."""
