"""The benchmark (benchmarks/bench.py, outside the package) and the precision tool on CPU with small random
T5 v1.1 encoders: every table row present, numbers sane, t5core compared with the fastest transformers set-up,
float16 with residual scales closer to float32 than bfloat16."""
import argparse
import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import torch

from t5core.scripts import t5_encoder_precision_parity as precision
from t5core.t5_common import T5Config
from tiny_models import TOKENIZER_DIR, make_hf_encoder, save_hf

BENCH_PY = Path(__file__).resolve().parents[1] / "benchmarks" / "bench.py"


def _load_bench():
    spec = importlib.util.spec_from_file_location("t5core_benchmarks_bench", BENCH_PY)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


bench = _load_bench()
HF_SETUPS = ["hf-eager-bf16", "hf-eager-compiled-bf16", "hf-sdpa-bf16", "hf-sdpa-compiled-bf16"]
BENCH_VARIANTS = ["ours-sdpa-bf16", *HF_SETUPS, "ours-sdpa-fp32"]
BENCH_SHAPES = ["1x32", "pad3x32"]


def test_bench_lives_outside_the_package_and_uses_the_public_api():
    import t5core

    assert not (Path(t5core.__file__).parent / "bench.py").exists()
    imports = [ln.strip() for ln in BENCH_PY.read_text().splitlines()
               if ln.strip().startswith(("import t5core", "from t5core"))]
    # the library's API and the precision tool's helpers (transformers loading, tables), nothing private
    assert [ln.split(" import ")[0] for ln in imports] == [
        "from t5core", "from t5core.precision", "from t5core.scripts.t5_encoder_precision_parity"], imports
    names = [n.strip() for ln in imports for n in ln.split(" import ")[1].strip("()").split(",")]
    assert not any(n.startswith("_") for n in names), imports
    for device in ("cuda", "cpu"):  # every transformers set-up a user can pick is timed by default
        names = bench.DEFAULT_VARIANTS[device].split(",")
        tag = "bf16" if device == "cuda" else "fp32"
        assert [n for n in names if n.startswith("hf-")] == [s.format(tag) for s in bench.HF_SETUPS]
        assert all(v.impl == "hf" or v.name.startswith("ours-") for v in bench.parse_variants(",".join(names)))
    v = bench.VARIANTS["hf-eager-compiled-bf16"]
    assert (v.impl, v.attn, v.compiled, v.dtype) == ("hf", "eager", True, torch.bfloat16)


def test_ratios_against_the_fastest_transformers_setup():
    """Each shape's baseline is the fastest transformers row at that shape, whichever it is, and it is named."""
    rows = [{"variant": v, "impl": v.split("-")[0], "shape": s, "ms": ms} for v, s, ms in [
        ("ours-a", "1x512", 9.0), ("hf-eager-bf16", "1x512", 18.0), ("hf-eager-compiled-bf16", "1x512", 10.8),
        ("hf-sdpa-compiled-bf16", "1x512", 13.3), ("ours-a", "8x512", 68.0), ("hf-eager-bf16", "8x512", 120.0),
        ("hf-sdpa-compiled-bf16", "8x512", 98.6), ("hf-eager-compiled-bf16", "8x512", 99.0)]]
    rows.append({"variant": "hf-sdpa-bf16", "impl": "hf", "shape": "1x512", "error": "load: OOM"})  # not timed
    bench.add_ratios(rows)
    by = {(r["variant"], r["shape"]): r for r in rows}
    assert by[("ours-a", "1x512")]["fastest_hf"] == "hf-eager-compiled-bf16"
    assert by[("ours-a", "1x512")]["x_fastest_hf"] == pytest.approx(10.8 / 9.0)
    assert by[("ours-a", "8x512")]["fastest_hf"] == "hf-sdpa-compiled-bf16"
    assert by[("hf-eager-bf16", "1x512")]["x_fastest_hf"] == pytest.approx(10.8 / 18.0)
    assert by[("hf-eager-compiled-bf16", "1x512")]["x_fastest_hf"] == pytest.approx(1.0)
    assert "x_fastest_hf" not in by[("hf-sdpa-bf16", "1x512")]
    table = bench.baseline_table(rows)
    assert "| 1x512 | 18.00 | 10.80 | 13.30 |  | hf-eager-compiled-bf16 (10.80) | 9.00 (1.20x) |" in table
    assert "| 8x512 | 120.0 | 99.00 | 98.60 |  | hf-sdpa-compiled-bf16 (98.60) | 68.00 (1.45x) |" in table


def test_shapes_inputs_and_flops():
    shapes = bench.parse_shapes("1x512, pad8x256")
    assert [s.name for s in shapes] == ["1x512", "pad8x256"] and shapes[1].padded and not shapes[0].padded
    with pytest.raises(ValueError):
        bench.parse_shapes("8by512")
    with pytest.raises(ValueError):
        bench.parse_variants("ours-sdpa-bf16,nope")
    # the published figure: 4.845 TFLOP per 512-token prompt for T5 v1.1 XXL
    assert bench.encoder_flops(T5Config.from_name("xxl"), 1, 512) == pytest.approx(4.845e12, rel=1e-3)

    inp = bench.make_inputs(bench.Shape(8, 256, padded=True), 32128, "cpu", seed=1)
    lengths = inp.mask.sum(1)
    assert inp.ids.shape == (8, 256) and lengths.min() >= 20 and lengths.max() <= 200
    for row, n in zip(inp.ids, lengths.tolist()):
        assert row[n - 1] == 1 and (row[n:] == 0).all() and (row[: n - 1] >= 3).all()
    assert torch.equal(inp.hf_mask, inp.mask.long())
    dense = bench.make_inputs(bench.Shape(2, 16), 32128, "cpu")
    assert dense.mask is None and (dense.ids[:, -1] == 1).all()


def test_report_command_repeats_the_run():
    """The report's first line is a command that parses back to the run's settings, defaults resolved, so a
    saved log says how it was made."""
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    args = parser.parse_args(["--device", "cpu", "--shapes", "1x32,pad3x32", "--rounds", "2", "--budget-s", "60.5"])
    args.size, args.variants = "small", bench.DEFAULT_VARIANTS["cpu"]  # what _setup resolves
    command = bench.rerun_command(args)
    assert command.startswith("python benchmarks/bench.py ")
    assert vars(parser.parse_args(command.split()[2:])) == vars(args)


def test_bench_cpu_tiny_folder(tmp_path, capsys):
    """The whole speed section, fast: a tiny Hugging Face folder (--model), transformers eager and SDPA attention
    against ours, one padded shape."""
    folder = save_hf(make_hf_encoder("t5-v1_1", num_layers=2), tmp_path / "tiny")
    variants = ["ours-sdpa-fp32", "hf-eager-fp32", "hf-sdpa-fp32"]
    res = bench.main(["--model", str(folder), "--device", "cpu", "--variants", ",".join(variants), "--shapes",
                      "pad2x16", "--seconds-per-case", "0.01", "--rounds", "2"])
    printed = capsys.readouterr().out
    rows = {r["variant"]: r for r in res["speed"]}
    assert list(rows) == variants
    fastest = min(variants[1:], key=lambda v: rows[v]["ms"])
    for v, r in rows.items():
        assert "error" not in r, r
        assert r["ms"] > 0 and r["fastest_hf"] == fastest and r["x_fastest_hf"] > 0
        assert r["rel_err"] < 1e-5 and r["mm_share"] > 0
        assert f"| {v} | pad2x16 |" in printed
    assert rows[fastest]["x_fastest_hf"] == pytest.approx(1.0)
    assert printed.count("python benchmarks/bench.py --device cpu --model ") == 1


@pytest.mark.slow
def test_bench_cpu_small(tmp_path, capsys):
    out_json = tmp_path / "bench.json"
    res = bench.main(["--size", "small", "--device", "cpu", "--sections", "speed,load,cold-start",
                      "--variants", ",".join(BENCH_VARIANTS), "--shapes", ",".join(BENCH_SHAPES),
                      "--seconds-per-case", "0.02", "--cold-variant", "ours-sdpa-fp32", "--out-json", str(out_json)])
    printed = capsys.readouterr().out

    speed = {(r["variant"], r["shape"]): r for r in res["speed"]}
    assert list(speed) == [(v, s) for s in BENCH_SHAPES for v in BENCH_VARIANTS]  # shape-major order
    for (v, s), r in speed.items():
        assert "error" not in r, (v, s, r["error"])
        assert r["ms"] > 0 and r["p10_ms"] <= r["ms"] <= r["p90_ms"] and r["runs"] >= 5
        assert r["x_fastest_hf"] > 0 and r["fastest_hf"] in HF_SETUPS and r["tflops"] > 0 and r["first_call_s"] > 0
        assert r["mm_share"] > 0 and r["burst_share"] > 0
        assert math.isfinite(r["rel_err"]) and r["rel_err"] < (1e-5 if v.endswith("fp32") else 3e-2)
        assert f"| {v} | {s} |" in printed
    for s in BENCH_SHAPES:  # the baseline is the fastest transformers set-up at that shape
        fastest = min(HF_SETUPS, key=lambda v: speed[(v, s)]["ms"])
        assert all(speed[(v, s)]["fastest_hf"] == fastest for v in BENCH_VARIANTS)
        assert speed[(fastest, s)]["x_fastest_hf"] == pytest.approx(1.0)
        assert max(speed[(v, s)]["x_fastest_hf"] for v in HF_SETUPS) == pytest.approx(1.0)
    assert "| shape | hf-eager-bf16 ms | hf-eager-compiled-bf16 ms |" in printed

    assert [r["loader"].split(":")[0] for r in res["load"]] == ["ours", "ours", "transformers"]
    for r in res["load"]:
        assert "error" not in r and r["seconds"] > 0 and r["weight_gb"] > 0
    assert [r["run"].split(":")[0] for r in res["cold_start"]] == ["cold", "warm restart"]
    for r in res["cold_start"]:
        assert "error" not in r, r
        assert r["first_call_s"] > 0 and r["steady_ms"] > 0 and r["process_s"] > r["load_s"]

    assert "| variant | shape | median ms |" in printed and "| loader |" in printed and "| run |" in printed
    assert json.loads(out_json.read_text())["speed"][0]["variant"] == BENCH_VARIANTS[0]


@pytest.mark.slow
def test_precision_layers_cpu():
    res = precision.main(["--size", "small", "--device", "cpu", "--seq-len", "32", "--dtype", "float16"])
    names = [r["name"] for r in res["layers"]]
    per_layer = ("layers.{}.attn", "layers.{}.ffn.hidden", "layers.{}.ffn", "layers.{}")
    assert names == [n.format(i) for i in range(8) for n in per_layer] + ["final_norm"]
    assert all(r["finite"] and r["absmax"] > 0 and r["absmax_f32"] > 0 for r in res["layers"])
    assert res["first_non_finite"] == "none"
    scale = {r["name"]: r["scale"] for r in res["layers"]}  # small preset: FFN-out 1/2 in layers 2 and 7
    assert scale["layers.1"] == 1 and scale["layers.2.ffn.hidden"] == 1 and scale["layers.2"] == 0.5
    assert scale["layers.7.attn"] == 0.5 and scale["layers.7"] == 0.25 and scale["final_norm"] == 1
    (err,) = res["errors"]
    assert err["finite"] and 0 < err["rel_err"] < 5e-3


def test_precision_names_the_overflowing_layer(tmp_path):
    """A model whose layer-1 FFN output passes 65504: float16 without scales breaks there, calibrated scales fix it."""
    hf = make_hf_encoder("t5-v1_1", num_layers=4, seed=3)
    with torch.no_grad():
        hf.encoder.block[1].layer[1].DenseReluDense.wo.weight[:8] *= 4e5
    folder = save_hf(hf, tmp_path / "overflow")
    base = ["--model", str(folder), "--device", "cpu", "--seq-len", "24", "--dtype", "float16"]

    broken = precision.main(base + ["--fp16-scales", "none"])
    assert broken["first_non_finite"] == "layers.1.ffn" and not broken["errors"][0]["finite"]
    fixed = precision.main(base + ["--fp16-scales", "calibrate"])
    assert fixed["first_non_finite"] == "none" and fixed["errors"][0]["rel_err"] < 5e-3
    assert any(r["scale"] < 1 for r in fixed["layers"] if r["name"] == "layers.1")


def test_precision_report_cpu():
    args = ["--size", "small", "--device", "cpu", "--report", "--fuse-norms"]
    # real prompts: padded batch, errors over real tokens only
    args += ["--tokenizer", str(TOKENIZER_DIR), "--prompt", "a cat", "--prompt", "a photo of a tree at dusk"]
    rows = {r["config"]: r for r in precision.main(args)["errors"]}
    assert list(rows) == [name for name, _, _ in precision.report_configs(precision_args(), None, "cpu")]
    for name, r in rows.items():
        assert "error" not in r, r
        assert r["finite"] and math.isfinite(r["rel_err"])
        q = list(r["quantiles"].values())
        assert q == sorted(q) and q[0] >= 0
    bf16 = rows["ours bf16"]["rel_err"]
    fp16 = rows["ours fp16 + residual scales"]["rel_err"]
    # issue 3: float16 with scales within 1/8 of bfloat16's error as users know it (transformers), and well
    # under our own bfloat16, which already keeps a float32 residual (the ideal ratio there is the rounding
    # step ratio, 8, so it is asserted at 6)
    assert fp16 <= rows["transformers bf16 (eager)"]["rel_err"] / 8, rows
    assert fp16 <= bf16 / 6, rows
    comfy = rows["ComfyUI-style: fp16 weights, fp32 compute"]["rel_err"]
    assert comfy < bf16
    assert rows["ours fp32 on fp16 weights"]["note"].startswith("weights float16")
    assert rows["ours fp32 on fp16 weights"]["rel_err"] <= comfy  # its embedding and norms are not rounded
    assert rows["transformers fp16 (eager)"]["note"] == "wo float32"  # transformers' _keep_in_fp32_modules
    assert rows["transformers bf16 (eager)"]["note"] == "wo bfloat16"
    assert rows["transformers fp32 (reference check)"]["rel_err"] < 1e-5


def precision_args():
    import argparse

    p = argparse.ArgumentParser()
    precision.add_arguments(p)
    return p.parse_args([])
