"""Flower strategies: FedAvg with deterministic sampling, compressed FedAvg, distillation."""
