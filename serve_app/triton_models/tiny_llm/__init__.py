"""The tiny model's Triton Python-backend code (a package so it ships in wheels)."""
