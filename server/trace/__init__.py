"""`POST /v1/trace`: a prompt's forward pass layer by layer, as JSON (a numbalm extension)."""
