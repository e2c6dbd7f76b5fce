import math
import re

import pytest
import torch

from ppcompile.evaluate import evaluate

TABLE = torch.tensor([[0.0, 1.0, 2.0], [1.0, 0.0, -1.0], [0.5, 0.5, 3.0]])  # bigram logits (V=3)


def bigram(ids, attention_mask=None):
    return TABLE[ids]  # (B, L, V)


def shifted(ids, attention_mask=None):
    return TABLE[ids] * 2.0


def _hand_nll(rows):
    """Mean NLL of next tokens under the bigram table, computed with plain floats."""
    total, count = 0.0, 0
    for row in rows:
        for cur, nxt in zip(row[:-1], row[1:]):
            logits = TABLE[cur].tolist()
            log_z = math.log(sum(math.exp(v) for v in logits))
            total += log_z - logits[nxt]
            count += 1
    return total / count


BATCHES = [torch.tensor([[0, 1, 2, 2], [2, 0, 0, 1]]), torch.tensor([[1, 1, 0, 2], [0, 2, 1, 0]])]


def test_perplexity_matches_hand_computation():
    (res,) = evaluate({"toy": bigram}, BATCHES, reference=None)
    rows = [r for b in BATCHES for r in b.tolist()]
    assert res.ppl == pytest.approx(math.exp(_hand_nll(rows)), rel=1e-6)
    assert res.tokens == 4 * 3
    assert res.batches == 2  # the warm-up run of batch 0 is not counted
    assert res.kl is None and res.top1 is None


def test_dense_against_itself_has_zero_kl_and_full_agreement():
    dense, same = evaluate({"dense": bigram, "same": bigram}, BATCHES)
    assert same.kl == pytest.approx(0.0, abs=1e-7)
    assert same.top1 == 1.0
    assert (dense.kl, dense.top1) == (0.0, 1.0)
    assert same.ppl == pytest.approx(dense.ppl)


def test_kl_matches_direct_computation():
    _, other = evaluate({"dense": bigram, "other": shifted}, BATCHES)
    kls = []
    for b in BATCHES:
        p = torch.softmax(TABLE[b[:, :-1]].double(), -1)
        q = torch.softmax(2.0 * TABLE[b[:, :-1]].double(), -1)
        kls.append((p * (p / q).log()).sum(-1).flatten())
    assert other.kl == pytest.approx(torch.cat(kls).mean().item(), rel=1e-5)
    assert 0.0 < other.kl


def test_padding_is_not_scored():
    ids = torch.tensor([[0, 1, 2, 2]])
    mask = torch.tensor([[1, 1, 1, 0]])  # the last token is padding: its target is not scored
    (res,) = evaluate({"toy": bigram}, [{"input_ids": ids, "attention_mask": mask}], reference=None)
    assert res.tokens == 2
    assert res.ppl == pytest.approx(math.exp(_hand_nll([[0, 1, 2]])), rel=1e-6)


def test_timing_counts_each_batch_once():
    calls = []

    def counting(ids, attention_mask=None):
        calls.append(ids.shape)
        return bigram(ids)

    (res,) = evaluate({"toy": counting}, BATCHES, reference=None)
    assert len(calls) == 3  # warm-up + 2 timed
    assert res.seconds_spread[0] <= res.seconds_per_batch <= res.seconds_spread[1]
    assert res.tokens_per_second == pytest.approx(8 / res.seconds_per_batch)


def test_unknown_reference_is_an_error():
    with pytest.raises(ValueError, match="reference"):
        evaluate({"pp": bigram}, BATCHES)


@pytest.mark.parametrize("batch, error, match", [
    ("some text", TypeError, "batch 1 is a str; expected a LongTensor (batch, seq) of token ids or a dict with "
                             "'input_ids' (and 'attention_mask')"),
    (BATCHES[0].float(), TypeError, "batch 1 is a torch.float32 tensor; expected a LongTensor"),
    (BATCHES[0][0], ValueError, "batch 1 has shape (4,); expected a LongTensor (batch, seq)"),
    ({"ids": BATCHES[0]}, ValueError, "batch 1 is a dict without 'input_ids' (keys: ['ids'])"),
])
def test_a_wrong_batch_is_an_error_naming_it(batch, error, match):
    calls = []

    def counting(ids, attention_mask=None):
        calls.append(ids.shape)
        return bigram(ids)

    with pytest.raises(error, match=re.escape(match)):
        evaluate({"toy": counting}, [BATCHES[0], batch], reference=None)
    assert len(calls) == 2  # batch 0 (warm-up and timed) ran; batch 1 was refused before running
