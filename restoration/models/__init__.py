"""Models: the architectures, the model zoo, public checkpoints and the restorer input/output conversions."""
