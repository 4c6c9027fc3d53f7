"""numbalm's tests: a package, so `tests/server` never shadows the real `server`."""
