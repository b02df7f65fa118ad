"""The error every weights reader raises for a checkpoint that is incomplete or inconsistent.

Its own module so that the loader and the quantized builder can both raise it without importing each other.
"""


class CheckpointError(ValueError):
    """A checkpoint is incomplete or inconsistent (missing files, tensors or shapes)."""
