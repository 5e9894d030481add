"""Operators: argument checks, the PyTorch reference path and the backend dispatch."""
