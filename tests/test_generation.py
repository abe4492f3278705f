"""Greedy and beam search: same token sequences as HF ``generate`` on the same weights, and
lock-step decoding across expert-parallel ranks.

The model is trained for a few seconds on a toy reversal task so that its outputs differ per
sentence and end in EOS at many different lengths (a random model repeats one token forever,
which would let a broken beam search pass).
"""

from __future__ import annotations

import datetime
import traceback

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

from moetrain.export import export_to_hf
from moetrain.models import build_model
from moetrain.moe import MoELayer
from moetrain.utils.net import free_port
from spawn_workers import run_workers

from test_models import reverse_batch, tiny_cfgs, train_reverse

MAX_LENGTH = 12


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(our model, HF model, source batch, source mask) on identical weights."""
    import transformers

    model, model_cfg, moe_cfg = train_reverse()
    out = tmp_path_factory.mktemp("gen") / "hf"
    export_to_hf(model.state_dict(), model_cfg, moe_cfg, out)
    hf = transformers.SwitchTransformersForConditionalGeneration.from_pretrained(str(out)).eval()
    src, mask, *_ = reverse_batch(torch.Generator().manual_seed(5), 10)
    return model, hf, src, mask


def hf_generate(hf, src, mask, **kwargs):
    out = hf.generate(input_ids=src, attention_mask=mask, max_length=MAX_LENGTH, do_sample=False, **kwargs)
    # HF's beam search fills the columns after EOS with EOS when pad_token_id is 0 (its
    # ``pad_token_id or eos_token_id`` fallback); moetrain writes pad there.
    after_eos = (out == 1).long().cumsum(dim=1) - (out == 1).long() > 0
    return out.masked_fill(after_eos, 0)


def test_outputs_are_varied(trained):
    model, _, src, mask = trained
    out = model.generate(src, mask, num_beams=4, length_penalty=0.6, max_length=MAX_LENGTH)
    assert out.shape[0] == 10 and out.shape[1] <= MAX_LENGTH and (out[:, 0] == 0).all()
    eos_at = {int((row == 1).nonzero()[0]) for row in out if (row == 1).any()}
    assert len(eos_at) >= 3, f"EOS positions {eos_at}: the test model is too degenerate"
    assert len({tuple(r.tolist()) for r in out}) >= 8


def test_greedy_matches_hf(trained):
    model, hf, src, mask = trained
    ours = model.generate(src, mask, num_beams=1, max_length=MAX_LENGTH)
    assert torch.equal(ours, hf_generate(hf, src, mask, num_beams=1))


@pytest.mark.parametrize("num_beams,length_penalty,early_stopping",
                         [(4, 0.6, True), (3, 1.0, True), (4, 2.0, False), (2, 0.0, True)])
def test_beam_search_matches_hf(trained, num_beams, length_penalty, early_stopping):
    model, hf, src, mask = trained
    ours = model.generate(src, mask, num_beams=num_beams, length_penalty=length_penalty, max_length=MAX_LENGTH,
                          early_stopping=early_stopping)
    theirs = hf_generate(hf, src, mask, num_beams=num_beams, length_penalty=length_penalty,
                         early_stopping=early_stopping)
    assert torch.equal(ours, theirs), f"\nours:\n{ours}\nhf:\n{theirs}"


def test_beam_differs_from_greedy_and_restores_mode(trained):
    model, _, src, mask = trained
    model.train()
    try:
        beam = model.generate(src, mask, num_beams=4, max_length=MAX_LENGTH)
        assert model.training
    finally:
        model.eval()
    greedy = model.generate(src, mask, num_beams=1, max_length=MAX_LENGTH)
    width = min(beam.shape[1], greedy.shape[1])
    assert not torch.equal(beam[:, :width], greedy[:, :width])


def test_batch_composition_does_not_change_results(trained):
    model, _, src, mask = trained
    whole = model.generate(src, mask, num_beams=4, max_length=MAX_LENGTH)
    for i in (0, 7):
        alone = model.generate(src[i : i + 1], mask[i : i + 1], num_beams=4, max_length=MAX_LENGTH)
        assert torch.equal(alone[0], whole[i, : alone.shape[1]])
        assert (whole[i, alone.shape[1] :] == 0).all()


def test_empty_batch_and_bad_arguments(trained):
    model, _, src, mask = trained
    for beams in (1, 4):
        out = model.generate(src[:0], mask[:0], num_beams=beams, max_length=MAX_LENGTH)
        assert out.shape == (0, 1)
    with pytest.raises(ValueError, match="max_length"):
        model.generate(src, mask, max_length=1)
    with pytest.raises(ValueError, match="num_beams"):
        model.generate(src, mask, num_beams=0)


# ---------------------------------------------------------------------------
# Expert parallelism: every rank steps until all are done
# ---------------------------------------------------------------------------

TIMEOUT_S = 120


def _ep_model(rank: int, weights: str):
    """The trained model rebuilt with 2-way expert parallelism; this rank holds experts 2r, 2r+1."""
    model_cfg, moe_cfg = tiny_cfgs(model__vocab_size=24)
    torch.manual_seed(0)
    model = build_model(model_cfg, moe_cfg, ep_size=2).eval()
    local = {}
    for key, value in load_file(weights).items():
        if ".deepspeed_experts." in key:
            head, tail = key.split(".deepspeed_experts.")
            g, rest = tail.split(".", 1)
            if int(g) // 2 != rank:
                continue
            key = f"{head}.deepspeed_experts.{int(g) % 2}.{rest}"
        local[key] = value
    model.load_state_dict(local)
    calls = [0]
    for layer in model.modules():
        if isinstance(layer, MoELayer):
            layer.set_process_group(dist.group.WORLD)
            layer.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return model, calls


def _ep_worker(rank: int, port: int, weights: str, src, mask, expected: dict):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=60))
    try:
        model, calls = _ep_model(rank, weights)
        # Rank 0 translates 7 sentences, rank 1 none (then one): rank 1 must keep stepping.
        for split in (7, 9):
            rows = torch.arange(split) if rank == 0 else torch.arange(split, 10)
            for beams in (1, 4):
                calls[0] = 0
                out = model.generate(src[rows], mask[rows], num_beams=beams, max_length=MAX_LENGTH,
                                     sample_ids=rows, dist_group=dist.group.WORLD)
                want = expected[beams][rows]
                want = want[:, : out.shape[1]] if rows.numel() else want[:, :1]
                assert torch.equal(out, want), (rank, split, beams, out, want)
                counts = [torch.zeros(1, dtype=torch.long) for _ in range(2)]
                dist.all_gather(counts, torch.tensor([calls[0]]))
                assert counts[0] == counts[1], f"MoE forwards per rank differ: {counts}"
        dist.barrier()
    except Exception:
        traceback.print_exc()
        raise
    finally:
        dist.destroy_process_group()


@pytest.mark.dist
def test_expert_parallel_decoding_steps_in_lockstep(trained, tmp_path):
    model, _, src, mask = trained
    weights = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(weights))
    expected = {b: model.generate(src, mask, num_beams=b, max_length=MAX_LENGTH) for b in (1, 4)}
    run_workers(_ep_worker, (free_port(), str(weights), src, mask, expected), "expert-parallel decoding",
                timeout_s=TIMEOUT_S, poll_s=2)
