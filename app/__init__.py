"""feedback-lm: a language model service that improves from human feedback."""
