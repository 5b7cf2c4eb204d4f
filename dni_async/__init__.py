"""dni-async: Decoupled Neural Interfaces (synthetic gradients), one OS process per layer."""

__version__ = "0.1.0"
