"""builder layer."""
