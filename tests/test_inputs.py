"""What users hand in is checked before any forward pass, each error naming the problem and the fix."""
import re

import pytest
import torch

from ppcompile.inputs import check_batch, check_batches, check_call, check_training

IDS = torch.randint(0, 128, (2, 12))
MASK = torch.ones(2, 12, dtype=torch.long)


# ---- batches ----
@pytest.mark.parametrize("batch, error, match", [
    ("some text", TypeError, "calibration batch 0 is a str; expected a LongTensor (batch, seq) of token ids or a dict "
                             "with 'input_ids' (and 'attention_mask'): tokenize it first"),
    ([1, 2, 3], TypeError, "calibration batch 0 is a list; expected a LongTensor (batch, seq)"),
    ({"text": "x"}, ValueError, "calibration batch 0 is a dict without 'input_ids' (keys: ['text']); expected"),
    ({"input_ids": [[1, 2]]}, TypeError, "calibration batch 0 is a list; expected"),
    (IDS.float(), TypeError, "calibration batch 0 is a torch.float32 tensor; expected a LongTensor (batch, seq)"),
    (IDS.bool(), TypeError, "calibration batch 0 is a torch.bool tensor"),
    (IDS[0], ValueError, "calibration batch 0 has shape (12,); expected a LongTensor (batch, seq) of token ids or a "
                         "dict with 'input_ids' (and 'attention_mask'): add the batch dim with ids.unsqueeze(0)"),
    (IDS[None], ValueError, "calibration batch 0 has shape (1, 2, 12)"),
    (IDS[:0], ValueError, "calibration batch 0 is empty (shape (0, 12))"),
    (IDS[:, :0], ValueError, "calibration batch 0 is empty (shape (2, 0))"),
    ({"input_ids": IDS, "attention_mask": MASK[:, :10]}, ValueError,
     "calibration batch 0's attention_mask has shape (2, 10) but its input_ids (2, 12): one mask entry per token"),
    ({"input_ids": IDS, "attention_mask": [[1] * 12] * 2}, TypeError, "calibration batch 0's attention_mask is a list"),
])
def test_a_wrong_batch_names_its_index_and_what_is_expected(batch, error, match):
    with pytest.raises(error, match=re.escape(match)):
        check_batch(batch, 0)


def test_good_batches_unpack_to_ids_and_mask():
    assert check_batch(IDS, 3) == (IDS, None)
    ids, mask = check_batch({"input_ids": IDS.int(), "attention_mask": MASK.bool()}, 0)
    assert ids.dtype == torch.int32 and mask.dtype == torch.bool
    with pytest.raises(TypeError, match=re.escape("batch 5 is a str")):
        check_batch("x", 5, "batch")


@pytest.mark.parametrize("batches, match", [
    ("some text", "calibration batches must be a list (or any iterable) of batches, got a str: tokenize the text "
                  "first"),
    (IDS, "calibration batches must be a list (or any iterable) of batches, got a Tensor: iterating a tensor of shape "
          "(2, 12) gives its rows: pass [ids] for one batch, or list(ids.split(8)) for batches of 8 rows"),
    ({"input_ids": IDS}, "got a dict: a dict is one batch (iterating it gives its keys): pass [batch]"),
    (3, "got an int: pass a list of batches"),
])
def test_one_batch_instead_of_a_list_of_batches_is_an_error(batches, match):
    with pytest.raises(TypeError, match=re.escape(match)):
        check_batches(batches)
    check_batches([IDS]), check_batches(iter([IDS])), check_batches((IDS, IDS))


# ---- calls of a compiled model ----
@pytest.mark.parametrize("args, kwargs, error, match", [
    ((IDS.float(),), {}, TypeError, "input_ids must be integer token ids (torch.long), got torch.float32: token ids "
                                    "come from a tokenizer (return_tensors='pt'); embeddings go in inputs_embeds="),
    ((), {"input_ids": IDS.half()}, TypeError, "input_ids must be integer token ids (torch.long), got torch.float16"),
    (([[1, 2]],), {}, TypeError, "input_ids must be a tensor of token ids (batch, seq), got a list"),
    (({"input_ids": IDS},), {}, TypeError, "got a dict: unpack it: model(**batch)"),
    ((IDS[0],), {}, ValueError, "input_ids must be (batch, seq), got shape (12,): add the batch dim with "
                                "input_ids.unsqueeze(0)"),
    ((IDS[:0],), {}, ValueError, "input_ids is empty (shape (0, 12)): pass at least one sequence of at least one "
                                 "token"),
    ((IDS[:, :0],), {}, ValueError, "input_ids is empty (shape (2, 0))"),
    ((IDS,), {"attention_mask": MASK[:, :10]}, ValueError,
     "attention_mask has shape (2, 10) but input_ids (2, 12): it needs the shape of input_ids, one entry per token"),
    ((IDS,), {"attention_mask": MASK[:1]}, ValueError, "attention_mask has shape (1, 12) but input_ids (2, 12)"),
    ((IDS,), {"attention_mask": MASK[0]}, ValueError, "attention_mask has shape (12,) but input_ids (2, 12)"),
    ((IDS,), {"attention_mask": MASK.tolist()}, TypeError, "attention_mask must be a tensor (batch, seq) like "
                                                           "input_ids, got a list"),
    ((), {}, ValueError, "the compiled model got neither input_ids nor inputs_embeds: call it with token ids"),
    ((IDS,), {"inputs_embeds": torch.zeros(2, 12, 8)}, ValueError, "got both input_ids and inputs_embeds"),
    ((), {"inputs_embeds": IDS}, TypeError, "inputs_embeds must be a float tensor (batch, seq, hidden), got "
                                            "torch.int64: token ids go in input_ids"),
    ((), {"inputs_embeds": torch.zeros(12, 8)}, ValueError,
     "inputs_embeds must be (batch, seq, hidden), got shape (12, 8)"),
    ((), {"inputs_embeds": torch.zeros(2, 0, 8)}, ValueError, "inputs_embeds is empty (shape (2, 0, 8))"),
])
def test_a_wrong_call_is_refused_before_the_model_runs(args, kwargs, error, match):
    with pytest.raises(error, match=re.escape(match)):
        check_call(args, kwargs, max_positions=256)


def test_good_calls_pass():
    assert check_call((IDS,), {}, max_positions=256) == []
    assert check_call((), {"input_ids": IDS.int(), "attention_mask": MASK.bool()}, max_positions=None) == []
    assert check_call((), {"inputs_embeds": torch.zeros(2, 12, 8), "attention_mask": MASK}, max_positions=256) == []
    # with a cache, the mask covers the cached tokens too; a 4-D mask is the model's to check
    assert check_call((IDS[:, :1],), {"attention_mask": MASK, "past_key_values": object()}, max_positions=256) == []
    assert check_call((IDS,), {"attention_mask": torch.ones(2, 1, 12, 12)}, max_positions=256) == []
    with pytest.raises(ValueError, match="at least the tokens of input_ids"):
        check_call((IDS,), {"attention_mask": MASK[:, :4], "cache": object()}, max_positions=256)


def test_a_sequence_past_the_model_positions_is_a_warning_not_an_error():
    long = torch.randint(0, 128, (1, 300))
    (warning,) = check_call((long,), {}, max_positions=256)
    assert warning.startswith("input of 300 tokens is longer than the model's max_position_embeddings (256): ")
    assert check_call((long,), {}, max_positions=300) == [] and check_call((long,), {}, max_positions=None) == []
    # with a cache, the position reached is the mask's length (cached + new tokens)
    (warning,) = check_call((IDS[:, :1],), {"attention_mask": torch.ones(2, 257), "cache": object()}, max_positions=256)
    assert "input of 257 tokens" in warning


def test_training_through_a_pruned_model_is_refused():
    with pytest.raises(RuntimeError, match=re.escape(
            "ppcompile prunes inference only: call model.eval() and run under torch.no_grad() / "
            "torch.inference_mode() (training through a pruned model is not supported)")):
        check_training(True)
    check_training(False)  # eval mode, gradients on or off: allowed
