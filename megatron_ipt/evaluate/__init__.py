"""Evaluation: scoring functions, reading-comprehension tasks from held-out documents (answer likelihood,
multiple choice, free-form generation), held-out perplexity per component, lm-evaluation-harness on a Hugging
Face folder, model scorers, and the validated results record."""
