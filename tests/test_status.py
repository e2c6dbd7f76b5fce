"""Site statuses are data: printed as users read them, classified by reason, never by text."""
import pytest
import torch

import ppcompile as pp
from ppcompile.models import random_model
from ppcompile.passes.status import PRUNED, Dense, Reason
from ppcompile.report import left_dense_unmatched


def test_a_status_prints_its_line_and_says_whether_the_config_chose_it():
    assert str(PRUNED) == "pruned" and not isinstance(PRUNED, Dense)
    assert str(Dense(Reason.BLOCKS, "mlp")) == "dense: blocks=mlp" and Dense(Reason.BLOCKS, "mlp").reason.chosen
    assert str(Dense(Reason.DOES_NOT_RUN, "RuntimeError: x")) == "dense: the rewritten block does not run (RuntimeError: x)"
    assert not Dense(Reason.UNSUPPORTED, "a side input ...").reason.chosen
    assert {r for r in Reason if r.chosen} == {Reason.SKIPPED_LAYER, Reason.BLOCKS, Reason.POLICY, Reason.CANNOT_PAY}


@pytest.mark.parametrize("options, reason", [(dict(blocks="mlp"), "BLOCKS"), (dict(policy="griffin"), "POLICY")])
def test_summary_rows_carry_the_reason_and_only_unchosen_ones_count_as_unmatched(options, reason):
    model = random_model("llama-gqa")
    c = pp.compile(model, 0.4, backend="eager", skip_layers=(0,), mlp_multiple=16, **options)
    with torch.no_grad():
        c(torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(0)))
    rows = model.pp.summary()
    attention = [r for r in rows if r["kind"] == "attention" and r["layer"]]
    skipped = [r for r in rows if r["layer"] == 0]
    assert attention and {r["reason"] for r in attention} == {reason}
    assert {r["reason"] for r in skipped} == {"SKIPPED_LAYER"}
    assert {r["reason"] for r in rows if r["kind"] == "mlp" and r["layer"]} == {None}
    assert not any(left_dense_unmatched(r) for r in rows)
    assert left_dense_unmatched({**attention[0], "reason": "UNSUPPORTED"})
