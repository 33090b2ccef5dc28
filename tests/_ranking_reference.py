"""Plain-Python reference for ranking metrics, shared by the metric and evaluation tests."""

from __future__ import annotations


def metrics_from_orders(orders: list[list[int]], q_ids, g_ids, ks) -> dict:
    """Rank-k / mAP / mINP from explicit per-query rankings (lists of gallery indices), in plain Python."""
    n_q = len(orders)
    hits_at = dict.fromkeys(ks, 0)
    ap_total = inp_total = 0.0
    missing = 0
    for q, order in enumerate(orders):
        ranks = [r + 1 for r, g in enumerate(order) if g_ids[g] == q_ids[q]]
        if not ranks:
            missing += 1
            continue
        for k in ks:
            hits_at[k] += ranks[0] <= k
        ap_total += sum(i / pos for i, pos in enumerate(ranks, start=1)) / len(ranks)
        inp_total += len(ranks) / ranks[-1]
    out = {f"rank{k}": hits_at[k] / n_q for k in ks}
    out.update(map=ap_total / n_q, minp=inp_total / n_q, n_queries=n_q, n_gallery=len(g_ids),
               n_queries_without_relevant=missing)
    return out
