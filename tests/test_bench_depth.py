"""benchmarks/depth.py: peak RSS per rank against depth, from bench.py's JSON dumps."""

import json

import pytest

from tests.helpers import benchmark_script

depth = benchmark_script("depth")


def dump(layers, rounds, hidden=2048):
    return {
        "shape": {"num_layers": layers, "hidden": hidden},
        "deltas": "lowrank-sparse",
        "device": "cpu",
        "rounds": [{"method": m, "runner": r, "ok": ok, "peak_rss": rss} for m, r, rss, ok in rounds],
    }


def test_each_row_takes_its_highest_round_at_each_depth_and_is_judged_deepest_over_shallowest():
    shallow = dump(12, [("linear", "distmerge×1", 500e6, True), ("linear", "distmerge×1", 520e6, True),
                        ("ties", "distmerge×1", 600e6, True)])  # fmt: skip
    deep = dump(50, [("linear", "distmerge×1", 560e6, True), ("ties", "distmerge×1", 700e6, True),
                     ("ties", "distmerge×1", 900e6, False)])  # a failed round has no peak that counts  # fmt: skip
    middle = dump(25, [("linear", "distmerge×1", 530e6, True)])
    layers, table = depth.peaks([deep, shallow, middle])
    assert layers == [12, 25, 50]
    assert table["linear", "distmerge×1"] == {12: 520e6, 25: 530e6, 50: 560e6}
    assert table["ties", "distmerge×1"] == {12: 600e6, 50: 700e6}
    got = {(m, r): (round(ratio, 4), flat) for m, r, ratio, flat in depth.verdicts(layers, table)}
    assert got == {("linear", "distmerge×1"): (round(560 / 520, 4), True), ("ties", "distmerge×1"): (round(7 / 6, 4), False)}


def test_a_row_missing_at_an_end_has_no_ratio_and_is_not_flat():
    layers, table = depth.peaks([dump(12, [("sce", "distmerge×2", 1e9, True)]), dump(50, [("sce", "distmerge×2", 1e9, False)])])
    assert depth.verdicts(layers, table) == [("sce", "distmerge×2", None, False)]


def test_dumps_that_differ_in_more_than_depth_or_repeat_one_are_refused(tmp_path, capsys):
    with pytest.raises(ValueError, match="differ in more than depth"):
        depth.peaks([dump(12, []), dump(50, [], hidden=1024)])
    with pytest.raises(ValueError, match="same depth"):
        depth.peaks([dump(12, []), dump(12, [])])
    paths = []
    for n, rss in ((12, 400e6), (50, 460e6)):
        paths.append(tmp_path / f"{n}.json")
        paths[-1].write_text(json.dumps(dump(n, [("linear", "distmerge×1", rss, True)])))
    assert depth.main([str(p) for p in paths]) == 0
    out = capsys.readouterr().out
    assert "0.40 GB" in out and "0.46 GB" in out and "1.15x MISS" in out and "0 PASS, 1 MISS" in out
