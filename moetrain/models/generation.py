"""Greedy and beam search for :class:`~moetrain.models.switch.SwitchTransformer`, with a K/V cache.

The search follows Hugging Face ``generate`` (transformers 5.x) step for step, so that on the
same weights ``hf_model.generate(num_beams=G, length_penalty=a, max_length=T,
early_stopping=True)`` returns the same token sequences (tests/test_generation.py checks it):

* every step keeps the ``2G`` best continuations over the sentence's ``G x V`` candidates;
  the ``G`` best that do not end (in EOS or at ``max_length``) keep running;
* a continuation among the first ``G`` that ends becomes a finished hypothesis scored
  ``sum log p / generated_len ** length_penalty`` (EOS counted, the start token not); each
  sentence keeps its ``G`` best finished hypotheses;
* with ``early_stopping=True`` a sentence is done once it holds ``G`` finished hypotheses;
  with ``False`` once the best running beam cannot beat the worst finished one at the
  current length (HF's heuristic). ``max_length`` counts the start token.

Two differences, neither changing any token: sentences that are done leave the batch (their
cache rows are dropped, so the work shrinks as sentences finish), and the columns after a
hypothesis' EOS hold ``pad_token_id`` (HF's beam search fills them with EOS when the pad id is 0).

Expert parallelism: every rank must run the same number of MoE forwards, or the all-to-all
hangs. With ``dist_group`` the loop runs until *all* ranks are done (an all-reduce MAX of an
"unfinished here" flag per step); a rank that is done steps with an empty batch.

Shapes: B sentences, G beams, A sentences still searching, V vocabulary, T max_length.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

__all__ = ["generate"]

NEG = -1.0e9  # HF's "impossible" score; kept identical so ties resolve the same way


@torch.no_grad()
def generate(model, input_ids: Tensor, attention_mask: Tensor | None = None, *, num_beams: int = 4,
             length_penalty: float = 0.6, max_length: int = 128, early_stopping: bool = True,
             sample_ids: Tensor | None = None, dist_group=None) -> Tensor:
    """Translate a batch: beam search, or greedy search when ``num_beams == 1``.

    Args:
        model: a ``SwitchTransformer`` (``encode``, ``new_cache``, ``decode_step``, ``model_cfg``).
        input_ids: ``[B, S]`` source tokens (B may be 0, e.g. an idle rank under EP).
        attention_mask: ``[B, S]`` 1 = token, 0 = padding.
        num_beams: beam size G.
        length_penalty: exponent of the generated length dividing a finished score.
        max_length: longest output row, start token included (HF's ``max_length``).
        early_stopping: True (HF ``early_stopping=True``) or False (HF's heuristic).
        sample_ids: ``[B]`` global sample indices (routing-noise ids); default ``arange(B)``.
        dist_group: process group whose ranks must step together (the expert-parallel group).

    Returns:
        ``[B, T_out]`` int64: ``decoder_start_token_id``, the best hypothesis, then
        ``pad_token_id``; ``T_out`` = 1 + the longest hypothesis in this rank's batch.

    The model runs in eval mode (no dropout, no routing noise); its mode is restored after.
    """
    if num_beams < 1:
        raise ValueError(f"num_beams must be >= 1, got {num_beams}")
    if max_length < 2:
        raise ValueError(f"max_length counts the start token and must be >= 2, got {max_length}")
    if early_stopping not in (True, False):
        raise ValueError(f"early_stopping must be True or False, got {early_stopping!r}")
    was_training = model.training
    model.eval()
    try:
        b = input_ids.shape[0]
        if sample_ids is None:
            sample_ids = torch.arange(b, device=input_ids.device)
        memory, _ = model.encode(input_ids, attention_mask, sample_ids)
        sync = _StepSync(dist_group, input_ids.device)
        if num_beams == 1:
            return _greedy(model, memory, attention_mask, sample_ids, max_length, sync)
        return _beam_search(model, memory, attention_mask, sample_ids, num_beams, length_penalty, max_length,
                            early_stopping, sync)
    finally:
        model.train(was_training)


class _StepSync:
    """``any_rank(flag)``: True while this rank or (with a group) any rank has work left."""

    def __init__(self, group, device):
        self.group, self.device = group, device
        self.steps = 0

    def any_rank(self, flag: bool) -> bool:
        if self.group is not None:
            t = torch.tensor([int(flag)], dtype=torch.int32, device=self.device)
            dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.group)
            flag = bool(t.item())
        self.steps += int(flag)
        return flag


def _greedy(model, memory: Tensor, attention_mask, sample_ids: Tensor, max_length: int, sync: _StepSync) -> Tensor:
    cfg = model.model_cfg
    b, device = memory.shape[0], memory.device
    out = torch.full((b, max_length), cfg.pad_token_id, dtype=torch.long, device=device)
    out[:, 0] = cfg.decoder_start_token_id
    cache = model.new_cache(memory, attention_mask, group=1)
    alive = torch.arange(b, device=device)  # sentences still generating
    prev = out[:, 0].clone()
    width, cur = 1, 1
    while sync.any_rank(alive.numel() > 0 and cur < max_length):
        logits = model.decode_step(prev, cache, sample_ids[alive])
        if alive.numel() > 0:
            nxt = logits.argmax(dim=-1)
            out[alive, cur] = nxt
            width = cur + 1
            keep = (nxt != cfg.eos_token_id).nonzero()[:, 0]
            alive, prev = alive[keep], nxt[keep]
            cache.select(keep, keep)
        cur += 1
    return out[:, :width]


class _Beams:
    """Running beams and finished hypotheses of every sentence (HF's vectorised beam search)."""

    def __init__(self, b: int, g: int, max_length: int, start: int, pad: int, device):
        self.g, self.max_length = g, max_length
        self.seqs = torch.full((b, g, max_length), pad, dtype=torch.long, device=device)
        self.seqs[:, :, 0] = start
        self.scores = torch.zeros(b, g, device=device)
        self.scores[:, 1:] = NEG  # only beam 0 is live at the start: no duplicate first tokens
        self.fin_seqs = self.seqs.clone()
        self.fin_scores = torch.full((b, g), NEG, device=device)
        self.fin_done = torch.zeros(b, g, dtype=torch.bool, device=device)
        self.fin_len = torch.zeros(b, g, dtype=torch.long, device=device)
        self.improvable = torch.ones(b, dtype=torch.bool, device=device)

    def step(self, a: Tensor, logp_AGV: Tensor, cur: int, eos: int, alpha: float, early_stopping: bool) -> Tensor:
        """Advance sentences ``a`` by one token; returns each new beam's parent beam ``[A, G]``."""
        g = self.g
        num, _, vocab = logp_AGV.shape
        total = (logp_AGV + self.scores[a][:, :, None]).reshape(num, g * vocab)
        cand_scores, cand = total.topk(2 * g, dim=-1)  # 2G: at most G of them can end in EOS
        cand_beam, cand_tok = cand // vocab, cand % vocab
        cand_seqs = self.seqs[a].gather(1, cand_beam[:, :, None].expand(-1, -1, self.max_length)).clone()
        cand_seqs[:, :, cur] = cand_tok
        ends = (cand_tok == eos) | (cur + 1 >= self.max_length)

        # The G best continuations that do not end keep running.
        running = cand_scores + ends.to(torch.float32) * NEG
        pick = running.topk(g, dim=-1).indices
        self.seqs[a] = cand_seqs.gather(1, pick[:, :, None].expand(-1, -1, self.max_length))
        self.scores[a] = running.gather(1, pick)
        parents = cand_beam.gather(1, pick)

        # Those of the first G that end compete for the G finished slots.
        first_g = torch.arange(2 * g, device=a.device) < g
        just_ended = ends & first_g[None, :]
        fin = cand_scores / ((cur + 1 - 1) ** alpha)
        full = self.fin_done[a].all(dim=-1, keepdim=True) & early_stopping
        fin = fin + full.to(torch.float32) * NEG
        fin = fin + (~self.improvable[a])[:, None].to(torch.float32) * NEG
        fin = fin + (~just_ended) * NEG
        merged_scores = torch.cat([self.fin_scores[a], fin], dim=1)
        keep = merged_scores.topk(g, dim=-1).indices
        merged_seqs = torch.cat([self.fin_seqs[a], cand_seqs], dim=1)
        self.fin_seqs[a] = merged_seqs.gather(1, keep[:, :, None].expand(-1, -1, self.max_length))
        self.fin_scores[a] = merged_scores.gather(1, keep)
        self.fin_done[a] = torch.cat([self.fin_done[a], just_ended], dim=1).gather(1, keep)
        new_len = torch.full_like(cand_tok, cur)  # generated tokens, EOS included
        self.fin_len[a] = torch.cat([self.fin_len[a], new_len], dim=1).gather(1, keep)

        # HF's early-stop heuristic, evaluated at the new length.
        best = self.scores[a][:, :1] / (cur ** alpha)
        worst = torch.where(self.fin_done[a], self.fin_scores[a].min(dim=1, keepdim=True).values, NEG)
        self.improvable[a] &= (best > worst).any(dim=-1)
        return parents

    def done(self, a: Tensor, early_stopping: bool) -> Tensor:
        """``[A]`` bool: the sentence's finished hypotheses can no longer change."""
        finished = self.fin_done[a].all(dim=-1)
        return (finished & early_stopping) | ~self.improvable[a]

    def best(self) -> Tensor:
        """``[B, 1 + longest best hypothesis]``: slot 0 holds each sentence's best."""
        width = 1 + int(self.fin_len[:, 0].max()) if self.fin_len.numel() else 1
        return self.fin_seqs[:, 0, :width]


def _beam_search(model, memory: Tensor, attention_mask, sample_ids: Tensor, g: int, alpha: float,
                 max_length: int, early_stopping: bool, sync: _StepSync) -> Tensor:
    cfg = model.model_cfg
    b, device = memory.shape[0], memory.device
    beams = _Beams(b, g, max_length, cfg.decoder_start_token_id, cfg.pad_token_id, device)
    cache = model.new_cache(memory, attention_mask, group=g)
    alive = torch.arange(b, device=device)
    cur = 1
    while sync.any_rank(alive.numel() > 0 and cur < max_length):
        prev = beams.seqs[alive, :, cur - 1].reshape(-1)
        logits = model.decode_step(prev, cache, sample_ids[alive].repeat_interleave(g))
        if alive.numel() > 0:
            logp = F.log_softmax(logits.float(), dim=-1).view(alive.numel(), g, -1)
            parents = beams.step(alive, logp, cur, cfg.eos_token_id, alpha, early_stopping)
            # Keep the sentences still searching; their cache rows follow the chosen parents.
            kept = (~beams.done(alive, early_stopping)).nonzero()[:, 0]
            rows = (kept[:, None] * g + parents[kept]).reshape(-1)
            cache.select(rows, kept)
            alive = alive[kept]
        cur += 1
    return beams.best()
