"""Compute-as-Teacher: reference synthesis, rewards and answer checking."""
