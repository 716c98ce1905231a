"""Turning ratings into a new model version: dataset, training, gate, publishing."""
