"""Loading models and processors (a hub id, a directory or "builtin"), building chat prompts and
batched inputs (loading), and tiny random models for tests (testing)."""
