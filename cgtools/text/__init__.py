"""Text: tokenizers, language models and the text analyses (perplexity)."""
