"""Evaluation: scoring functions, reading-comprehension tasks from held-out documents, model scorers, results."""
