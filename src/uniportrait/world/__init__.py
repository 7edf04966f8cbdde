"""The identity world: procedurally drawn people, for training and measuring identity-preserving
generation on a CPU. See ``docs/world.md``."""
