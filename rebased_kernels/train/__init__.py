"""Training utilities: synthetic data (MQAR) for ReBased experiments."""
