"""`make bench`: what chatmesh adds over calling the model directly. See bench/run.py."""
