"""prefork client role."""
