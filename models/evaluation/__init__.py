"""Evaluation: ranking metrics, the evaluation of a model on a split, tables, gate recovery."""
