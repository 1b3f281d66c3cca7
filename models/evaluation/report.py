"""The metrics table the command lines print."""

from __future__ import annotations


def format_table(rows: list[dict], columns: list[str]) -> str:
    head = "| " + " | ".join(columns) + " |"
    sep = "|" + "|".join("---" for _ in columns) + "|"
    body = ["| " + " | ".join(str(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join([head, sep, *body])


TABLE_METRICS = ("hr@10", "ndcg@10", "mrr", "hr@20")


def table_row(name: str, masked: dict, unmasked: dict) -> dict:
    """One row of the metrics table: the history-masked metrics and unmasked NDCG@10, formatted."""
    return {
        "model": name,
        **{k: f"{masked[k]:.4f}" for k in TABLE_METRICS},
        "ndcg@10 unmasked": f"{unmasked['ndcg@10']:.4f}",
    }
