"""Dataset reading, validation, normalisation, splitting (prepare) and sharded tokenisation (tokenize)."""
