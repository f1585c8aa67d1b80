"""Smoke runs of the benchmark scripts in benchmarks/ (their timings are measured by hand, never asserted)."""


def test_benchmark_runs_and_reports(pools):
    """A smoke run of every benchmark shape (timings are not asserted: they live in the README, measured)."""
    from benchmarks.bench import bench_rank, format_table, table_row

    rows = []
    for shape in ("small", "block", "llama", "llama-sp"):
        result = pools.run(2, bench_rank, shape, 2, 1)[0]
        variants = {"dtp", "torch", "single"} | ({"hand"} if shape != "llama-sp" else set())
        assert set(result["median"]) == variants
        assert result["param_mib"]["dtp"] < result["param_mib"]["single"]
        assert set(result["plan_ms"]) == {"dtp", "dtp_local", "torch"} and min(result["plan_ms"].values()) > 0
        rows.append(table_row(shape, 2, "gloo", result))
    table = format_table(rows)
    assert "dtp/torch" in table and all(f"| {s} | 2 |" in table for s in ("small", "block", "llama", "llama-sp"))
    profiled = pools.run(2, bench_rank, "small", 1, 1, False, True)
    assert set(profiled[0]["profile"]) == {"dtp", "torch", "hand"} and profiled[1]["profile"] == {}
    assert "Self CPU" in profiled[0]["profile"]["dtp"] and "aten::" in profiled[0]["profile"]["dtp"]


def test_overhead_benchmark_runs(pools):
    """A smoke run of `python -m benchmarks.bench_overhead`'s per-rank part (timings are not asserted)."""
    from benchmarks.bench_overhead import overhead_rank

    result = pools.run(2, overhead_rank, "small", 4)[0]
    assert set(result) == {"dtp", "hand", "dtp - hand"}
    assert all(len(v) == 2 and all(isinstance(t, int) for t in v) for v in result.values())


def test_variants_run_in_a_fresh_order_each_round():
    """Each round runs every variant once, in an order every rank computes alike, and no variant always follows the
    same one (a rotation A B C D, B C D A, ... would: its cyclic predecessor never changes)."""
    from benchmarks.interleave import round_order

    names = ("dtp", "torch", "hand", "single", "dtp_compiled", "torch_compiled")
    rounds = [round_order(names, r) for r in range(25)]
    assert all(sorted(order) == sorted(names) for order in rounds)
    assert rounds == [round_order(list(names), r) for r in range(25)]  # a function of the round alone
    for name in names:
        before = {order[order.index(name) - 1] for order in rounds if order.index(name) > 0}
        assert len(before) >= 3, (name, before)
