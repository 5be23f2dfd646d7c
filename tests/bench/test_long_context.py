"""bench/long_context.py's search on a tiny cap: cp=2 fits a longer sequence than one process, each length found is
the longest of its grid that fits (the next one measured over the cap), and the JSON says how memory was measured."""

import json

from bench.long_context import main


def test_cp2_trains_longer_sequences_under_the_same_cap(tmp_path):
    out = tmp_path / "lc.json"
    main(["--cap-mib", "8", "--archs", "gla", "--start", "256", "--grid", "128", "--max-seq", "4096",
          "--out", str(out)])
    result = json.loads(out.read_text())
    row = result["rows"]["gla"]
    cap = result["cap_bytes"]
    for cp in ("cp1", "cp2"):
        r = row[cp]
        assert r["longest_seq"] % 128 == 0 and r["peak_bytes"] <= cap < r["first_over_cap_peak_bytes"]
        assert r["first_over_cap"] == r["longest_seq"] + 128  # the bisection ends on neighbours of the grid
        peaks = sorted((p["seq"], p["peak_bytes"]) for p in r["probes"])
        assert [b for _, b in peaks] == sorted(b for _, b in peaks)  # longer sequences never measure smaller
    assert row["cp2"]["longest_seq"] >= 1.5 * row["cp1"]["longest_seq"]
    assert "PeakMemory" in result["method"] and result["table"][0].startswith("arch")
