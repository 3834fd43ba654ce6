"""bench.py runs end to end in its --quick mode (tiny sizes): a smoke test, not a timing test."""
import json

import bench
import spot


def test_quick_bench_writes_every_requested_section_and_restores_attention(tmp_path):
    path = tmp_path / "bench.json"
    original = spot.attention
    assert bench.main(["--quick", "--only", "train,attention", "--json", str(path)]) == 0
    assert spot.attention is original          # the attention swap is undone after timing
    report = json.loads(path.read_text())
    results = report["results"]
    assert set(results) == {"train", "attention"}
    assert [row["tokens"] for row in results["train"]] == list(bench.TOKEN_COUNTS)
    assert [row["precision"] for row in results["attention"]] == ["fp32", "bf16"]
    for row in results["train"] + results["attention"]:
        assert all(t > 0 for times in row["times_s"].values() for t in times)
    assert "## 5. Training step with spot.attention" in report["markdown"]
