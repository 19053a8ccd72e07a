"""After training: `make eval`, `make export` and loading an exported model for inference."""
