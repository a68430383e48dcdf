"""benchmarks/seqgate.py runs end to end with --quick and prints its tables (never checks a timing).

The tiny random Llama keeps this test offline and fast (no GGUF conversion); `--quick` on the default
SmolLM2-135M is the same code path with the real model.
"""

import json
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PCT = r"[+-][0-9]+\.[0-9]{2}%"
GAIN = rf"{PCT} \[{PCT}, {PCT}\]"
ARMS = ("static", "seqgate", "seqgate, memory off")


def test_seqgate_benchmark_quick_prints_every_arm_at_every_guardrail(tmp_path):
    out_json = tmp_path / "seqgate.json"
    out = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "seqgate.py"), "--quick", "--model", "tiny-llama", "--no-progress",
         "--json", str(out_json)],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    text = out.stdout
    assert re.search(r"load average at start [0-9.]+ [0-9.]+ [0-9.]+, at end [0-9.]+ [0-9.]+ [0-9.]+", text)
    for guardrail in ("1%", "2%", "5%"):
        assert re.search(rf"^  {guardrail}: calibrated tau \S+ Bg \S+ -> final tau \S+ Bg \S+ .*holds True", text, re.M)
        for arm in ARMS:
            validation = "n/a" if arm == "seqgate, memory off" else PCT
            row = (rf"^ +{guardrail}  {re.escape(arm)} +{validation} +{PCT} +[0-9]+% +[0-9.]+% +[0-9.]+% +{GAIN} +{GAIN}$")
            assert re.search(row, text, re.M), (guardrail, arm)
        for workload in ("prefill", "decode"):
            assert f"guardrail {guardrail}, {workload} tokens/s:" in text
    assert re.search(r"^target \(SeqGate at guardrail 1%.*\): (met|not met)$", text, re.M)
    assert text.count("5 interleaved repeats after 1 warm-up round(s)") == 2 + 3 * 2  # kernels + 3 guardrails x 2

    results = json.loads(out_json.read_text())
    assert [p["guardrail"] for p in results["points"]] == [0.01, 0.02, 0.05]
    for point in results["points"]:
        assert point["holds"] and point["guardrail_steps"][-1]["delta_ppl"] <= point["guardrail"]
        assert set(point["arms"]) == set(ARMS)
        assert set(point["timing"]["prefill"]["gains"]) == set(ARMS)
        assert 0 <= point["decisions_changed_by_memory"] <= 1
    assert set(results["kernels"]) == {"1", str(results["settings"]["window"])}
