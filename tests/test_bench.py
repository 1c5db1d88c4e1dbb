"""Smoke test of ``python -m msa.bench``: it runs end to end on the CPU at --tiny sizes. No timing assertions."""

import importlib.util
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from msa.bench import SECTIONS, NaivePairMSCMAT, build_parser
from msa.mscmat import MSCMAT

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT_S = 900  # generous: the CPU may be shared with training runs


def run_bench(tmp_path: Path, *args: str) -> dict:
    out = tmp_path / "out.json"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(
        [sys.executable, "-m", "msa.bench", "--tiny", "--device", "cpu", "--json", str(out), *args],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=TIMEOUT_S,
    )
    assert proc.returncode == 0, f"stdout:\n{proc.stdout[-4000:]}\nstderr:\n{proc.stderr[-4000:]}"
    result = json.loads(out.read_text())
    result["_stdout"] = proc.stdout
    return result


def times_in(node, path=""):
    """Every wall-clock duration in the report (keys ending in _ms or _s, or 's'), CPU-time counters excepted."""
    if isinstance(node, dict):
        for key, value in node.items():
            here = f"{path}.{key}"
            if isinstance(value, (dict, list)):
                yield from times_in(value, here)
            elif (key.endswith(("_ms", "_s")) or key == "s") and not key.endswith("cpu_s"):
                yield here, value
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from times_in(value, f"{path}[{i}]")


def positive(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    return run_bench(tmp_path_factory.mktemp("bench"))


def test_reports_exactly_the_requested_sections(full_run):
    assert full_run["sections"] == list(SECTIONS)
    assert set(full_run) - {"meta", "sections", "_stdout"} == set(SECTIONS)
    for title in ("train step", "MSCMAT forward + backward", "evaluation", "input pipeline"):
        assert f"== {title}" in full_run["_stdout"]


def test_every_time_is_finite_and_positive(full_run):
    found = dict(times_in({k: full_run[k] for k in SECTIONS}))
    assert len(found) > 20
    bad = {k: v for k, v in found.items() if not positive(v)}
    assert not bad, bad


def test_sections_have_their_measurements(full_run):
    meta = full_run["meta"]
    assert meta["device_type"] == "cpu" and meta["tiny"] and positive(meta["matmul"]["tflops"])
    batch_sizes = meta["batch_sizes"]

    train = full_run["train"]["rows"]
    assert [r["batch_size"] for r in train] == batch_sizes
    for r in train:
        assert r["status"] == "ok"
        for key in ("ms_per_step", "pairs_per_s", "peak_mem_bytes", "flops_per_step", "mfu", "encoders_ms"):
            assert positive(r[key]), (key, r)

    mscmat = full_run["mscmat"]
    assert mscmat["agreement"]["max_abs_diff"] < 1e-4
    assert mscmat["agreement"]["max_abs_grad_diff"] < 1e-4
    assert [r["batch_size"] for r in mscmat["rows"]] == batch_sizes
    for r in mscmat["rows"]:
        assert r["naive_status"] == "ok"  # tiny sizes fit every budget
        for key in ("library_ms", "library_mem_bytes", "naive_ms", "naive_mem_bytes", "speedup_vs_naive"):
            assert positive(r[key]), (key, r)

    ev = full_run["eval"]
    assert ev["scaled_down"] and "SCALED DOWN" in full_run["_stdout"]
    for key in ("image_embed_s", "text_embed_s", "rank_s", "total_s"):
        assert positive(ev[key])
    assert positive(ev["end_to_end"]["s"]) and ev["end_to_end"]["images"] > 0

    loader = full_run["loader"]["rows"]
    assert [r["workers"] for r in loader] == [0, 1]
    for r in loader:
        assert positive(r["pairs_per_s"]) and positive(r["pairs_per_cpu_s"]) and r["batches"] > 0
    assert positive(full_run["loader"]["pairs_per_core_s"])


def test_train_section_times_the_engine_step(full_run):
    assert full_run["train"]["step"] == "msa.engine.train_step"
    assert "step: msa.engine.train_step" in full_run["_stdout"]


def test_timed_step_is_msa_engine_train_step(monkeypatch, capsys):
    """Every timed, warm-up and FLOP-counting call of the train section goes through the engine's step,
    with model and optimizer from the engine's prepare_training: --fused-adamw / --channels-last set the
    config fields the engine reads, nothing is applied bench-side."""
    import msa.bench.cli
    import msa.engine

    calls, prepared = [], []
    real, real_prepare = msa.engine.train_step, msa.engine.prepare_training

    def counting(model, batch, optimizer, cfg, device):
        calls.append((batch["images"].shape[0], optimizer.defaults.get("fused"), cfg.train.fused_adamw,
                      cfg.train.channels_last))
        return real(model, batch, optimizer, cfg, device)

    def preparing(cfg, model, device, *args, **kwargs):
        prepared.append((cfg.train.fused_adamw, cfg.train.channels_last, cfg.train.compile))
        return real_prepare(cfg, model, device, *args, **kwargs)

    for key in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.setenv(key, "1")
    monkeypatch.setattr(msa.engine, "train_step", counting)
    monkeypatch.setattr(msa.engine, "prepare_training", preparing)
    threads = torch.get_num_threads()
    try:
        assert msa.bench.cli.main(["--tiny", "--device", "cpu", "--sections", "train", "--batch-sizes", "2",
                                   "--steps", "2", "--warmup", "1", "--fused-adamw", "--channels-last",
                                   "--no-encoders-row", "--matmul-tflops", "1"]) == 0
    finally:
        torch.set_num_threads(threads)
    assert prepared == [(True, True, False)]
    assert calls == [(2, True, True, True)] * 4  # FLOP count + 1 warm-up + 2 timed
    assert "optimizer: AdamW(fused=True)" in capsys.readouterr().out


def test_package_stays_on_the_model_library():
    """Importing msa.bench (every section module) loads nothing of the runtime, retrieval or orchestration."""
    code = "import sys, msa.bench; print(' '.join(sorted(sys.modules)))"
    loaded = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300,
                            check=True).stdout.split()
    forbidden = ("msa.runtime", "msa.retrieval", "flows", "ray", "mlflow", "prefect")
    assert not [m for m in loaded if m in forbidden or m.startswith(tuple(f + "." for f in forbidden))]
    for module in (ROOT / "msa" / "bench").glob("*.py"):
        assert len(module.read_text().splitlines()) < 500, module.name


def test_cpu_run_is_never_compared_with_the_gpu_reference(full_run):
    out = full_run["_stdout"]
    assert "not comparable" in out and "targets (GPU)" not in out
    assert "x_reference_pairs_per_s" not in json.dumps(full_run["train"])


def test_a_subset_of_sections(tmp_path):
    result = run_bench(tmp_path, "--sections", "mscmat", "--batch-sizes", "3", "--no-encoders-row")
    assert result["sections"] == ["mscmat"]
    assert set(result) - {"meta", "sections", "_stdout"} == {"mscmat"}
    assert "== train step" not in result["_stdout"]
    assert result["mscmat"]["agreement"]["max_abs_diff"] < 1e-4


def test_profile_names_where_the_train_step_spends_its_time(tmp_path):
    """--profile: per batch size, torch.profiler's operators by self time (CPU time here), printed and in the JSON."""
    result = run_bench(tmp_path, "--sections", "train", "--batch-sizes", "2,3", "--no-encoders-row", "--profile")
    for row in result["train"]["rows"]:
        prof = row["profile"]
        assert prof["steps"] == 3 and prof["self_time"] == "cpu" and "device_busy_ms" not in prof
        ops = {op["op"]: op for op in prof["top_ops"]}
        assert 0 < len(ops) <= 12 and all(positive(op["self_ms"]) and op["calls"] > 0 for op in ops.values())
        assert any(name.startswith("aten::") and "conv" in name for name in ops)  # the image tower's convolutions
        step = [op for name, op in ops.items() if name.startswith("Optimizer.step")]
        assert [op["calls"] for op in step] == [1.0]  # figures per step, not per 3 steps
        assert f"== profile of the train step, B={row['batch_size']}" in result["_stdout"]


def test_clip_preset_trains_on_random_towers_with_clip_captions(tmp_path):
    """The CLIP presets' rows: random towers without a checkpoint, captions from CLIP's own tokenizer."""
    out = tmp_path / "clip.json"
    proc = subprocess.run(
        [sys.executable, "-m", "msa.bench", "--device", "cpu", "--preset", "clip-vit-b32", "--sections", "train",
         "--batch-sizes", "2", "--steps", "1", "--warmup", "0", "--no-encoders-row", "--matmul-tflops", "1",
         "--json", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=TIMEOUT_S)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(out.read_text())
    (row,) = result["train"]["rows"]
    assert row["batch_size"] == 2 and row["status"] == "ok"
    assert positive(row["pairs_per_s"]) and positive(row["flops_per_step"])
    assert "open_clip:ViT-B-32 @224px" in proc.stdout and "77 tokens" in proc.stdout


def test_naive_baseline_matches_library_at_paper_width():
    torch.manual_seed(0)
    library = MSCMAT((256, 512, 1024, 2048), d_model=768, num_heads=12).double()
    with torch.no_grad():
        for p in library.parameters():  # move every parameter off its init so each one matters
            p.add_(0.05 * torch.randn_like(p))
    naive = NaivePairMSCMAT(library)
    g = torch.Generator().manual_seed(1)
    feats = [torch.randn(3, c, generator=g, dtype=torch.float64) for c in (256, 512, 1024, 2048)]
    tokens = torch.randn(2, 30, 768, generator=g, dtype=torch.float64)  # rectangular: 3 images x 2 captions
    cls = torch.nn.functional.normalize(torch.randn(2, 768, generator=g, dtype=torch.float64), dim=-1)
    with torch.no_grad():
        torch.testing.assert_close(naive(feats, tokens, cls), library(feats, tokens, cls), rtol=0, atol=1e-12)


def test_help_explains_every_option(capsys):
    parser = build_parser()
    for action in parser._actions:
        if action.option_strings and action.dest != "help":
            assert action.help and len(action.help) > 15, action.option_strings
    with pytest.raises(SystemExit) as exit_:
        parser.parse_args(["--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    for option in ("--preset", "--batch-sizes", "--device", "--steps", "--warmup", "--bf16", "--no-bf16",
                   "--sections", "--tiny", "--matmul-tflops", "--json"):
        assert option in text


def test_gpu_check_script_runs_valid_bench_commands():
    """bench/gpu_check.sh runs only on a GPU machine: here its shell parses and every msa.bench and
    bench_shards.py command in it is accepted by that benchmark's own parser (a renamed option would
    otherwise surface on a lent GPU)."""
    script = ROOT / "bench" / "gpu_check.sh"
    subprocess.run(["bash", "-n", str(script)], check=True, timeout=60)
    text = script.read_text().replace("\\\n", " ")
    text = text.replace("$bench", re.search(r'^bench="(.*)"$', text, re.M).group(1))

    def step_args(program: str) -> list[str]:
        """What follows ``program`` on each ``step`` line that runs it."""
        return [line.split(program, 1)[1] for line in text.splitlines()
                if line.strip().startswith("step ") and program in line]

    commands = step_args("msa.bench")
    assert len(commands) == 4
    parser = build_parser()
    for command in commands:
        args = [a.strip('"') for a in command.replace('"$b"', "32").replace("$out", "out").split()]
        parser.parse_args(args)
    assert "tests/test_gpu.py" in text
    shard_steps = step_args("bench_shards.py")
    assert len(shard_steps) == 1
    spec = importlib.util.spec_from_file_location("bench_shards", ROOT / "bench" / "bench_shards.py")
    bench_shards = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench_shards)
    shard_args = bench_shards.build_parser().parse_args(shard_steps[0].replace('"$work"', "/tmp").split())
    assert shard_args.scaling and shard_args.like == "rsicd" and shard_args.jsonl


def test_rejects_unknown_sections():
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--sections", "train,nope"])
