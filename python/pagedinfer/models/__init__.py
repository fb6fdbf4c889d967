"""Model architectures, their registry, and weight loading."""
