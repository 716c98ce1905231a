"""Model code: loading checkpoints, generating text, holding the active version."""
