"""The tutorial's shop: two services exchanging events (docs/tutorial.md)."""
