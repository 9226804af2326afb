"""Sampling groups of completions, the batch types that carry them to the loss, scoring log-probs."""
