"""Accelerate trainer for stage 1 (generic prior) and stage 2 (personal prior)."""
