"""Training workers: `python -m train CONFIG [key=value ...]` (see train/__main__.py)."""
