"""``benchmarks/bench_pipeline.py`` end to end on the CPU with the tiny Wan and HunyuanVideo pipelines: every phase
runs, the JSON holds one entry per transformer call and the replayed schedule (the GPU run is the same code)."""
import json
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
pytest.importorskip("diffusers")


@pytest.mark.parametrize("model, calls_per_step", [("tiny", 2), ("hunyuan-tiny", 1)])
def test_bench_pipeline_smoke(tmp_path, model, calls_per_step):
    import bench_pipeline
    bench_pipeline.main(["--model", model, "--device", "cpu", "--steps", "4", "--no-compile",
                         "--schedule", "88S8", "8848", "--out", str(tmp_path)])
    res = json.loads((tmp_path / f"pipeline_{model}.json").read_text())
    assert res["phase"] == "done" and res["guidance"] == bench_pipeline.GUIDANCE[res["family"]]
    for key, sched in (("dvdquant", [8, 8, 0, 8]), ("dvdquant_2", [8, 8, 4, 8])):
        run = res[key]
        assert run["schedule"] == sched and run["finite"]
        assert run["transformer_calls"] == len(run["call_seconds"]) == 4 * calls_per_step
    assert res["dvdquant"]["skipped_steps"] == 1 and "speedup_call_s" in res["dvdquant"]
    assert "warmup_dvdquant_s" in res and "warmup_dvdquant_2_s" in res


def test_warm_up_schedule_holds_every_kind_of_step():
    import bench_pipeline
    assert bench_pipeline.warm_up_schedule("884SSS4SSS4SS4") == "884S8"
    assert bench_pipeline.warm_up_schedule("8848") == "884"
    assert bench_pipeline.warm_up_schedule("88S8") == "88S8"
    assert bench_pipeline.warm_up_schedule("8888") == "88"
