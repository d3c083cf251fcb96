"""Helpers shared by the test suites: real processes to test against."""
