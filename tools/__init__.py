"""Tools that run the launcher: compare, plot, bench. Nothing in the library imports them."""
