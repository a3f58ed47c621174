"""Pipeline stages: make_*_step factories and the thin loops that run them."""
