"""Training, evaluation and checkpoints (import the submodules: ``labkit.engine.evaluate``)."""
