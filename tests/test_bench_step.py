"""`moetrain bench step` on configs/tiny.yaml at a tiny batch: it runs through the command line,
its JSON holds positive numbers, the two models agree before timing, and the check can fail.

No speed assertions: timings on a shared CPU are noise at these sizes.
"""

from __future__ import annotations

import contextlib
import io
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from moetrain import cli
from moetrain.bench import step

pytestmark = pytest.mark.hf
pytest.importorskip("transformers")

REPO_ROOT = Path(__file__).resolve().parents[1]
TINY = str(REPO_ROOT / "configs" / "tiny.yaml")
SMALL = ["--batch-size", "4", "--src-len", "8", "--tgt-len", "8", "--repeats", "2", "--warmup", "1",
         "--threads", "1", "--matmul-size", "128"]


def run_bench(*argv: str) -> tuple[int, str, str]:
    """``moetrain bench step ...`` in process: exit code, stdout, stderr."""
    threads = torch.get_num_threads()
    out, err = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = cli.main(["bench", "step", *argv])
    finally:
        torch.set_num_threads(threads)  # main() sets it for the whole process
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """One small run with --json and --profile (a few seconds)."""
    root = tmp_path_factory.mktemp("bench_step")
    code, stdout, stderr = run_bench("--config", TINY, *SMALL, "--json", str(root / "step.json"),
                                     "--profile", str(root / "prof"))
    assert code == 0, stderr
    return stdout, json.loads((root / "step.json").read_text()), root


def test_json_has_positive_numbers_for_both_models(tiny_run):
    _, report, _ = tiny_run
    assert report["tokens_per_step"] == 4 * (8 + 8)
    assert (report["repeats"], report["warmup"], report["threads"]) == (2, 1, 1)
    assert report["torch"] == torch.__version__ and report["device"].startswith(("cpu", "cuda"))
    assert report["forced"] == list(step.FORCED)
    assert report["matmul"]["n"] == 128 and report["matmul"]["gflops"] > 0
    assert set(report["models"]) == {"moetrain", "hf"}
    for model in report["models"].values():
        assert len(model["seconds"]) == 2
        for key in ("median_s", "min_s", "tokens_per_s", "tokens_per_s_best", "gflops", "gflops_best",
                    "fraction_of_matmul", "fraction_of_matmul_best"):
            assert isinstance(model[key], float) and model[key] > 0, (key, model)
        assert model["min_s"] <= model["median_s"]
        assert model["tokens_per_s"] == pytest.approx(report["tokens_per_step"] / model["median_s"])
        assert model["gflops"] == pytest.approx(report["model_flops_per_step"] / model["median_s"] / 1e9)
    ours, hf = report["models"]["moetrain"], report["models"]["hf"]
    assert report["ratio_moetrain_over_hf"]["median"] == pytest.approx(ours["tokens_per_s"] / hf["tokens_per_s"])
    # the machine's state beside the timings (the share is None only where /proc/stat is missing)
    assert report["load_average_at_start"] >= 0
    assert report["cpu_others_share"] is None or 0 <= report["cpu_others_share"] <= 1


def test_the_two_models_compute_the_same_loss(tiny_run):
    stdout, report, _ = tiny_run
    check = report["loss_check"]
    assert check["moetrain_ce"] == pytest.approx(check["hf_ce"], rel=step.LOSS_RTOL)
    assert check["rel_diff"] <= step.LOSS_RTOL and check["moetrain_ce"] > 0
    assert "loss check: cross-entropy moetrain" in stdout


def test_bf16_runs_both_models_under_autocast(tiny_run, tmp_path):
    _, fp32, _ = tiny_run
    code, stdout, stderr = run_bench("--config", TINY, *SMALL, "--precision", "bf16", "--json", str(tmp_path / "b.json"))
    assert code == 0, stderr
    report = json.loads((tmp_path / "b.json").read_text())
    assert report["precision"] == "bf16" and "both models under bf16 autocast" in stdout
    check = report["loss_check"]
    assert check["rel_diff"] <= step.BF16_LOSS_RTOL
    # autocast really applied: bf16 rounding moves both losses away from the fp32 ones
    assert check["moetrain_ce"] != fp32["loss_check"]["moetrain_ce"] and check["hf_ce"] != fp32["loss_check"]["hf_ce"]
    assert check["moetrain_ce"] == pytest.approx(fp32["loss_check"]["moetrain_ce"], rel=1e-2)
    assert "of one bf16" in stdout


def test_analytic_flops_are_what_hf_runs(tiny_run):
    """HF's attention is plain matmuls, so FlopCounterMode sees all of its work: it must count
    exactly the analytic formula. moetrain's fused CPU attention kernels are partly invisible to it."""
    _, report, _ = tiny_run
    flops = report["model_flops_per_step"]
    assert flops == step.step_flops(step.load_bench_config(TINY, []).model, step.load_bench_config(TINY, []).moe,
                                    4, 8, 8)
    assert report["counted_flops_per_step"]["hf"] == flops
    assert 0.9 * flops <= report["counted_flops_per_step"]["moetrain"] <= flops


def test_prints_the_table_and_writes_the_profile(tiny_run):
    stdout, report, root = tiny_run
    assert "moetrain / HF tokens/s:" in stdout and "x matmul" in stdout
    assert "forced after --set: model.dropout_rate=0 moe.capacity_factor=null" in stdout
    text = (root / "prof" / "step_profile.txt").read_text()
    assert "moetrain: top" in text and "hf: top" in text and "aten::mm" in text
    for name in ("moetrain", "hf"):
        assert f"{name}: top {step.PROFILE_ROWS} operators by self time" in stdout
        top = report["profile"][name]
        assert top and all(r["self_ms"] >= 0 and r["calls"] >= 1 for r in top)


def test_no_hf_times_moetrain_alone(tmp_path):
    code, stdout, stderr = run_bench("--config", TINY, *SMALL, "--no-hf", "--json", str(tmp_path / "step.json"))
    assert code == 0, stderr
    report = json.loads((tmp_path / "step.json").read_text())
    assert set(report["models"]) == {"moetrain"} and report["loss_check"] is None
    assert "ratio_moetrain_over_hf" not in report and "moetrain / HF" not in stdout


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_a_timed_step_computes_each_models_loss_once(monkeypatch, precision):
    """The cross-entropy the agreement check reads is not computed again inside the timed steps:
    for HF it would be a second pass over the vocabulary charged to HF's time."""
    cfg = step.load_bench_config(TINY, [])
    ours, hf = step.build_models(cfg)
    batch = step.make_batch(cfg, 4, 8, 8)
    calls = []

    def counting(real):
        def wrapper(logits, *args, **kwargs):
            if logits.shape[-1] == cfg.model.vocab_size:  # a pass over the vocabulary
                calls.append(real.__name__)
            return real(logits, *args, **kwargs)
        return wrapper

    # HF's loss goes through F.cross_entropy, moetrain's label-smoothed loss through F.log_softmax
    for name in ("cross_entropy", "log_softmax"):
        monkeypatch.setattr(torch.nn.functional, name, counting(getattr(torch.nn.functional, name)))
    for contender in (step.moetrain_contender(cfg, ours, batch), step.hf_contender(hf, batch)):
        if precision == "bf16":
            contender = step.with_autocast(contender, torch.device("cpu"), torch.bfloat16)
        calls.clear()
        contender.step()
        assert len(calls) == 1, (contender.name, calls)
        calls.clear()
        assert contender.cross_entropy() > 0 and len(calls) >= 1


def test_the_agreement_check_fails_when_the_hf_weights_differ():
    cfg = step.load_bench_config(TINY, [])
    ours, hf = step.build_models(cfg)
    batch = step.make_batch(cfg, 4, 8, 8)
    step.check_agreement(step.moetrain_contender(cfg, ours, batch), step.hf_contender(hf, batch))  # same weights
    with torch.no_grad():
        expert = hf.encoder.block[1].layer[1].mlp.experts["expert_0"].wo.weight
        expert.add_(0.05 * torch.randn_like(expert))
    with pytest.raises(step.AgreementError, match="disagree"):
        step.check_agreement(step.moetrain_contender(cfg, ours, batch), step.hf_contender(hf, batch))


def test_disagreement_stops_the_command_before_timing(monkeypatch, tmp_path):
    build = step.hf_model

    def perturbed(cfg, state_dict):
        hf = build(cfg, state_dict)
        with torch.no_grad():
            hf.shared.weight.mul_(1.01)
        return hf

    monkeypatch.setattr(step, "hf_model", perturbed)
    report = tmp_path / "step.json"
    code, stdout, stderr = run_bench("--config", TINY, *SMALL, "--json", str(report))
    assert code == 2
    assert stderr.strip().startswith("moetrain bench step: the two models disagree on the batch")
    assert "nothing was timed" in stderr and "tokens/s" not in stdout and not report.exists()


def test_recipes_hf_cannot_reproduce_are_refused():
    code, _, stderr = run_bench("--config", TINY, "--set", "moe.estimator=sparsemixer", *SMALL)
    assert code == 2 and "moe.estimator 'sparsemixer' computes another function" in stderr
    code, _, stderr = run_bench("--config", str(REPO_ROOT / "configs" / "electra_tiny.yaml"), *SMALL)
    assert code == 2 and "measures translation models" in stderr


def test_options_import_no_torch():
    code = ("import sys, argparse; from moetrain.bench import step_options; "
            "step_options.add_arguments(argparse.ArgumentParser()); assert 'torch' not in sys.modules")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=60,
                            env={"PYTHONPATH": str(REPO_ROOT), "PATH": "/usr/bin:/bin"})
    assert result.returncode == 0, result.stderr
