"""CaT-RL: GRPO-family losses (`grpo`) and the trainer (`trainer`)."""
