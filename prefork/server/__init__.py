"""prefork server role."""
