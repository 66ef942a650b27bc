"""diffusers adapters (installed as ``freecure_ops.adapters``)."""
