"""The HTTP app's plumbing, whatever the protocol (see server/__init__.py)."""
