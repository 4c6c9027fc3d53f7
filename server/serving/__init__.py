"""What runs a request, whatever its wire format (see server/__init__.py)."""
