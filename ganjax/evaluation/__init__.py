"""Evaluation: in-loop aging metrics (and, later, FID/KID, age accuracy, identity)."""
