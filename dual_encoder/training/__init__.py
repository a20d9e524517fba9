"""Training: strategy selection and the one training loop that serves every strategy."""
