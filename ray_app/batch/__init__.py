"""Batch recommendations on Ray Data: every user's top-k from a checkpoint, with the Combiner's ranking."""
