"""Flower ServerApp: builds the strategy from config, runs rounds, records and checkpoints."""
