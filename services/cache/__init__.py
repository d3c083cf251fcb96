"""The answer cache: replies already given, found again by everything that shaped them."""
