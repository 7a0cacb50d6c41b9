"""benchmarks/bench.py's summary of repeated rounds (the benchmark itself prints figures; it is not a test)."""

from tests.helpers import benchmark_script

bench = benchmark_script("bench")


def run(method, runner, repeat, wall, rss, rc=0):
    return bench.Run(method, runner, ["x"], repeat=repeat, rc=rc, wall=wall, cpu_user=1.0, cpu_sys=0.0, rank_rss=rss)


def test_each_runner_is_its_median_round_with_its_highest_peak():
    rounds = [
        run("linear", "mergekit", 0, 20.0, [3]), run("linear", "distmerge×2", 0, 9.0, [5, 1]),
        run("linear", "mergekit", 1, 30.0, [2]), run("linear", "distmerge×2", 1, 7.0, [1, 6]),
        run("linear", "mergekit", 2, 25.0, [4]), run("linear", "distmerge×2", 2, 8.0, [2, 2]),
    ]  # fmt: skip
    by = bench.representatives(rounds)
    assert list(by) == [("linear", "mergekit"), ("linear", "distmerge×2")]
    assert by["linear", "mergekit"].wall == 25.0 and by["linear", "mergekit"].repeat == 2
    assert by["linear", "mergekit"].rank_rss == [4]
    assert by["linear", "distmerge×2"].wall == 8.0 and by["linear", "distmerge×2"].rank_rss == [5, 6]


def test_an_even_count_takes_the_lower_middle_and_a_failed_round_is_the_figure():
    by = bench.representatives([run("ties", "mergekit", k, w, [1]) for k, w in enumerate([4.0, 1.0, 3.0, 2.0])])
    assert by["ties", "mergekit"].wall == 2.0
    failed = run("ties", "distmerge×1", 1, None, [], rc=1)
    by = bench.representatives([run("ties", "distmerge×1", 0, 5.0, [1]), failed])
    assert by["ties", "distmerge×1"] is failed and not by["ties", "distmerge×1"].ok
