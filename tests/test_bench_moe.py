"""A smoke run of benchmarks/bench_moe.py's per-rank part (timings are measured by hand, never asserted)."""


def test_moe_benchmark_runs_and_reports(pools):
    from benchmarks.bench_moe import SHAPES, moe_rank, table

    rows = []
    for shape in ("layer", "model"):
        result = pools.run(2, moe_rank, shape, 1, 1)[0]  # dtp's and the hand-written outputs checked equal inside
        assert set(result["median"]) == {"dtp", "hand", "single"} and 0 < result["a2a_share"] < 1
        batch, seq = SHAPES[shape][1]
        pairs = 2 * batch * seq * SHAPES[shape][0]["top_k"]  # every (token, expert) pair of both ranks, none dropped
        assert sum(result["per_expert"]) == sum(result["per_rank"]) == pairs and result["imbalance"] >= 1
        rows.append((shape, 2, result))
    assert "| layer | 2 |" in table(rows) and "| model | 2 |" in table(rows)
