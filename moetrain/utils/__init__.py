"""Small helpers shared by the command line and the trainer (no torch imports here)."""
