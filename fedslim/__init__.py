"""fedslim: communication-efficient federated training on Flower + PyTorch."""

__version__ = "0.1.0"
