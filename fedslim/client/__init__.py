"""Flower ClientApp: decode the global model, train locally, reply with the update."""
