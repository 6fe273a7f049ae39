"""Scripts that produce the assets the engine ships (trained Medusa heads, the DMC retrofit)."""
