"""bench/goals.py reads issue 13's figures from the lines bench/gpu.sh's benches print."""

from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _goals():
    spec = importlib.util.spec_from_file_location("goals", ROOT / "bench" / "goals.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_goals_read_the_benches_lines_for_each_engine_configuration(tmp_path):
    (tmp_path / "bench-engine.txt").write_text(
        "engine              41000 tokens/s, MFU 21.5%, peak memory 30.1 GiB\n"
        "plain               30000 tokens/s, MFU 15.7%, peak memory 60.0 GiB\n"
        "engine+compile      46000 tokens/s, MFU 36.0%, peak memory 29.0 GiB\n"
        "engine[master]      45000 tokens/s, MFU 23.6%, peak memory 20.0 GiB\n"
        "engine[master]/plain throughput ratio: 1.50\n"
        "engine/plain throughput ratio: 1.37\n"
        "engine/plain peak memory ratio: 0.50\n"
        "engine+compile/plain throughput ratio: 1.53\n"
        "engine+compile/plain peak memory ratio: 0.48\n"
        "engine/TRL padding-free + Liger throughput ratio: 0.93\n")
    lines = _goals().verdicts(tmp_path)
    assert lines[0].startswith("met")
    assert "engine 1.37, engine[master] 1.5, engine+compile 1.53 (goal ≥ 1.5)" in lines[0]
    assert lines[1].startswith("met") and "engine 21.5, engine[master] 23.6, engine+compile 36" in lines[1]
    assert lines[2].startswith("met") and "engine 0.5, engine+compile 0.48 (goal ≤ 0.6)" in lines[2]
    assert lines[3].startswith("missed") and "engine 0.93 (goal ≥ 1)" in lines[3]
    assert lines[4].startswith("not measured") and "bench-memory.txt" in lines[4]
    (tmp_path / "bench-memory.txt").write_text("memory after 3 train() calls / after 1: 1.08  (goal ≤ 1.05)\n")
    assert _goals().verdicts(tmp_path)[4].startswith("missed")
    assert _goals().context(tmp_path) == []
    with (tmp_path / "bench-engine.txt").open("a") as fh:
        fh.write("matrix products alone (9216 tokens a step): 40.1 ms a step, 229000 tokens/s, model-FLOPs "
                 "utilisation 83.0% — the ceiling of any engine here\n")
    assert _goals().context(tmp_path) == ["context       matrix products alone (9216 tokens a step): 40.1 ms a step, "
                                          "229000 tokens/s, model-FLOPs utilisation 83.0% — the ceiling of any "
                                          "engine here"]
    with (tmp_path / "bench-engine.txt").open("a") as fh:
        fh.write("products + attention + AdamW alone (9216 tokens a step): 40.1 + 20.3 + 4.2 = 64.6 ms a step, "
                 "142700 tokens/s, model-FLOPs utilisation 51.5% — the ceiling with the work every step does besides "
                 "its products\n")
    (tmp_path / "bench-norm.txt").write_text("fused/eager lean RMSNorm time ratio (master weights (bf16)): 0.31 "
                                             "(fused/transformers: 0.22)\n")
    (tmp_path / "bench-head.txt").write_text("compiled/eager chunked head time ratio: 0.62 "
                                             "(eager chunked/plain: 1.1)\n")
    (tmp_path / "bench-profile-master.txt").write_text("profiled step: 120.0 ms of GPU time\nGPU busy 64% of an "
                                                       "unprofiled step (kernels 120.0 ms for 9,000 tokens)\n")
    lines = _goals().context(tmp_path)
    assert len(lines) == 5 and lines[0].startswith("context       matrix products alone")
    assert lines[2] == ("context       engine[master]: GPU busy 64% of an unprofiled step (kernels 120.0 ms for "
                        "9,000 tokens)")
    assert lines[3].startswith("context       fused/eager lean RMSNorm") and lines[4].endswith("plain: 1.1)")
    assert lines[1].startswith("context       products + attention + AdamW alone (9216 tokens a step): 40.1 + 20.3")


def test_the_busy_line_reads_kernel_time_per_token_against_the_next_steps_wall_time():
    spec = importlib.util.spec_from_file_location("engine_bench", ROOT / "bench" / "engine.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    line = mod.busy_line(0.1, {"input_tokens": 5000}, {"input_tokens": 8000, "tokens_per_s": 25000.0}, 4321)
    # 0.1 s for 5,000 tokens is 20 µs a token; the next step took 40 µs a token: busy half of it
    assert line.startswith("GPU busy 50% of an unprofiled step (kernels 100.0 ms for 5,000 tokens; the next step "
                           "8,000 tokens at 25,000 tokens/s); 4,321 kernel launches")


def test_the_sync_line_counts_the_debug_modes_warnings_by_place(tmp_path):
    """``--profile``'s ``host syncs in an engine step`` line from the warnings PyTorch's sync debug mode records
    (the CUDA step cannot run here: warning records stand in), read beside the goals by ``bench/goals.py``."""
    import warnings

    spec = importlib.util.spec_from_file_location("engine_bench", ROOT / "bench" / "engine.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    msg = "called a synchronizing CUDA operation"

    def rec(text, file, line):
        return warnings.WarningMessage(UserWarning(text), UserWarning, file, line)

    records = [rec(msg, "/x/masking_utils.py", 761)] * 4 + [rec(msg, "/y/engine.py", 1043),
                                                            rec("something else", "/y/engine.py", 9)]
    line = mod.sync_line(records)
    assert line == "host syncs in an engine step: 5 — masking_utils.py:761 ×4, engine.py:1043"
    assert mod.sync_line([]) == "host syncs in an engine step: 0"
    (tmp_path / "bench-profile.txt").write_text(f"profiled step: 1 ms\n{line}\n")
    assert _goals().context(tmp_path) == [f"context       engine: {line}"]


def test_a_flash_attention_run_counts_as_further_configurations(tmp_path):
    (tmp_path / "bench-engine.txt").write_text("engine/plain throughput ratio: 1.37\n")
    (tmp_path / "bench-engine-fa2.txt").write_text("engine/plain throughput ratio: 1.62\n")
    line = _goals().verdicts(tmp_path)[0]
    assert line.startswith("met") and "engine 1.37, flash_attention_2 engine 1.62 (goal ≥ 1.5)" in line
