"""Models: tokenizers, building and loading causal LMs, padding, likelihood scoring, greedy generation, and the chat
client for endpoints and local models."""
