"""dev layer."""
