"""Small shared utilities: atomic file writes and Hydra resolvers."""
