"""The models' shared interface, the decay kernel as the weighting actually applied, exact carry-forward of decay
states, and the training losses (no Spark needed)."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch
from ebbtide.models import MODELS, Batch, build_model
from ebbtide.models.base import DAY_SECONDS, kernel_half_life
from ebbtide.train import next_item_loss, param_groups


def toy_batch(n_items=20, batch=3, length=6, seed=0) -> Batch:
    g = torch.Generator().manual_seed(seed)
    items = torch.randint(1, n_items + 1, (batch, length), generator=g)
    lengths = torch.tensor([length, length - 2, 2][:batch])
    items[1, length - 2:] = 0
    items[2, 2:] = 0
    ts = torch.cumsum(torch.rand(batch, length, generator=g, dtype=torch.float64) * DAY_SECONDS, dim=1)
    return Batch(items, ts, torch.randint(0, 4, (batch, length), generator=g),
                 torch.zeros(batch, length, dtype=torch.long), lengths)


@pytest.mark.parametrize("name", MODELS)
def test_models_share_one_interface(name):
    torch.manual_seed(0)
    model = build_model(name, n_items=20, n_types=4, dim=8, max_len=6).eval()
    batch = toy_batch()
    now = batch.ts.max(dim=1).values + 3600
    user = model.encode(batch, now)
    assert user.shape == (3, 8) and torch.isfinite(user).all()
    assert model.score(user).shape == (3, 20)
    assert model.item_embeddings().shape == (20, 8)
    week_later = model.encode(batch, now + 7 * DAY_SECONDS)
    assert not torch.allclose(user, week_later), "the query time must change the embedding"
    # causal: position 2 must not see events 3.. of the same row
    positions = model(batch, batch.ts)
    changed = dataclasses.replace(batch, items=batch.items.clone())
    changed.items[0, 4] = (changed.items[0, 4] % 20) + 1
    assert torch.allclose(positions[0, :4], model(changed, batch.ts)[0, :4], atol=1e-5)


@pytest.mark.parametrize("name", MODELS)
def test_every_table_added_into_an_event_vector_has_the_item_scale(name):
    model = build_model(name, n_items=500, n_types=4, dim=64, max_len=50)
    item = model.item_emb.weight[1:].detach().norm(dim=1).mean()
    assert 0.5 < float(model.type_emb.weight.detach().norm(dim=1).mean() / item) < 2
    if hasattr(model, "pos_emb"):
        assert 0.5 < float(model.pos_emb.weight.detach().norm(dim=1).mean() / item) < 2


def test_decay_pool_kernel_is_the_weighting_it_applies():
    """The user embedding is head(sum_j w_type * kernel(age_j) * e_j / (sum + lambda)): the plotted kernel."""
    torch.manual_seed(1)
    model = build_model("decay_pool", 20, 4, 8, 6).eval()
    with torch.no_grad():
        model.log_tau.copy_(torch.tensor([0.3, 2.0, 9.0]).log())
        model.mix_logits.copy_(torch.tensor([0.2, -0.5, 1.0, 0.3]))
        model.type_weight.copy_(torch.tensor([0.0, 0.4, -0.3, 0.8, 0.1]))
    batch = toy_batch()
    t_q = batch.ts.max(dim=1).values + 2.5 * DAY_SECONDS
    row, n = 0, int(batch.lengths[0])
    ages = ((t_q[row] - batch.ts[row, :n]) / DAY_SECONDS).float()
    weights = model.decay_kernel(ages) * model.type_weight.exp()[batch.types[row, :n]]
    events = model.embed_events(batch)[row, :n]
    pooled = (weights[:, None] * events).sum(0) / (weights.sum() + model.log_pseudo_count.exp())
    assert torch.allclose(model.encode(batch, t_q)[row], model.head(pooled), atol=1e-5)
    # kernel(0) = 1 and it decays to the long-term share
    assert float(model.decay_kernel(torch.zeros(1))) == pytest.approx(1.0)
    assert float(model.decay_kernel(torch.tensor([math.inf]))) == pytest.approx(float(model.mix()[0]))


def test_half_life_is_read_off_the_kernel():
    days = np.linspace(0, 60, 6001)
    assert kernel_half_life(0.3 + 0.7 * np.exp2(-days / 2.0), days, 0.3) == pytest.approx(2.0, abs=0.01)
    assert kernel_half_life(np.ones_like(days), days, 1.0) == math.inf
    model = build_model("decay_pool", 10, 4, 8, 6, half_lives_days=[4.0])
    report = model.decay_report()
    assert report["part_half_life_days"] == pytest.approx([4.0])
    assert report["half_life_days"] == pytest.approx(4.0, rel=0.01)   # one decaying part: its own half-life


def test_decay_states_carry_forward_exactly():
    """Nightly's incremental path: states at t1, rescaled to t2, give the embedding of a full encode at t2."""
    torch.manual_seed(2)
    model = build_model("decay_pool", 20, 4, 8, 6).eval()
    batch = toy_batch()
    t1 = batch.ts.max(dim=1).values + 3600.0
    t2 = t1 + 3.7 * DAY_SECONDS
    with torch.no_grad():
        states, masses = model.final_state(batch, t1)
        carried = model.combine(*model.rescale(states, masses, t2 - t1))
        assert torch.allclose(carried.float(), model.combine(*model.final_state(batch, t2)).float(), atol=1e-6)
        assert torch.allclose(carried.float(), model.encode(batch, t2), atol=1e-5)


def test_full_and_sampled_softmax_losses():
    model = build_model("gru", 20, 4, 8, 6)
    batch = toy_batch()
    full, n = next_item_loss(model, batch, full_softmax=True, log_q=None)
    sampled, _ = next_item_loss(model, batch, full_softmax=False, log_q=torch.log(torch.full((20,), 1 / 20)))
    assert n == int((batch.items[:, 1:] > 0).sum()) and torch.isfinite(full) and torch.isfinite(sampled)
    sampled.backward()
    assert model.item_emb.weight.grad is not None
    # a batch without targets contributes nothing but still reaches every parameter (DDP needs that)
    empty = dataclasses.replace(batch, first_target=torch.full((3,), 99))
    zero, none = next_item_loss(model, empty, full_softmax=True, log_q=None)
    assert none == 0 and float(zero) == 0.0


def test_first_target_limits_the_counted_targets():
    batch = dataclasses.replace(toy_batch(), first_target=torch.tensor([4, 1, 1]))
    mask = batch.target_mask()
    assert mask[0].tolist() == [False, False, False, True, True]      # positions 4 and 5 of row 0
    assert mask[1].sum() == 3 and mask[2].sum() == 1


def test_sampled_softmax_corrects_with_the_inclusion_probability():
    """With log-Q, the logit of a candidate drops by log(1 - (1 - q)^n), its chance to be among the candidates."""
    model = build_model("decay_pool", 4, 4, 8, 6).eval()      # no dropout: two passes must agree
    batch = toy_batch(n_items=4)
    q = torch.tensor([0.7, 0.1, 0.1, 0.1])
    with_q, n = next_item_loss(model, batch, full_softmax=False, log_q=q.log())
    t_next = torch.cat([batch.ts[:, 1:], batch.ts[:, -1:]], dim=1)
    valid = batch.target_mask()
    users = model(batch, t_next)[:, :-1][valid]
    targets = batch.items[:, 1:][valid] - 1
    candidates, label = torch.unique(targets, return_inverse=True)
    inclusion = 1 - (1 - q[candidates]) ** n
    logits = users @ model.item_emb(candidates + 1).T - inclusion.log()
    expected = torch.nn.functional.cross_entropy(logits, label, reduction="sum")
    assert float(with_q) == pytest.approx(float(expected), rel=1e-5)


def test_weight_decay_spares_embeddings_and_time_scales():
    from ebbtide.config import TrainConf

    model = build_model("decay_transformer", 20, 4, 8, 6)
    groups = param_groups(model, TrainConf(weight_decay=0.1))
    decayed = {id(p) for p in groups[0]["params"]}
    assert id(model.item_emb.weight) not in decayed and id(model.type_emb.weight) not in decayed
    assert id(model.blocks[0].attn.log_rate) in {id(p) for p in groups[2]["params"]}
    assert groups[0]["weight_decay"] == 0.1 and groups[1]["weight_decay"] == 0.0
