"""Training: static ViTs (static.py) and MIA-Former's hybrid supervised + reinforcement training (mia.py)."""
