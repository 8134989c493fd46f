"""Flower's PyTorch quickstart on scikit-learn's digits, with fedslim's compression."""
