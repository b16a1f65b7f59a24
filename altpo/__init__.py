"""altpo: the AltPO unlearning trainer (data, packing, reference cache, training loop, CLI)."""

__version__ = "0.1.0"
