"""The meta-step: meta-gradients against finite differences, similarity weights, the update."""

import pytest
import torch
from conftest import random_batch

from metarec_dist.meta.step import (
    LOCAL,
    MetaConfig,
    RunningDirection,
    TaskBatch,
    centered,
    combine,
    initial_inner_lrs,
    meta_step,
    run_task,
    task_similarity,
    task_weights,
)
from metarec_dist.model.encoder import EncoderConfig
from metarec_dist.model.recommender import ModelConfig, SequenceRecommender


def tiny_model(seed=0):
    torch.manual_seed(seed)
    config = ModelConfig(
        width=8, item_width=6, encoder=EncoderConfig(layers=1, heads=2, max_length=5, dropout=0.0),
        vq={"num_codebooks": 2, "codewords": 6},
    )
    return SequenceRecommender(config, {"t": 12, "a": 15, "b": 9}).double()


def batch(num_items, seed):
    return random_batch(num_items, seed)


TASK = TaskBatch("a", support=batch(15, 1), query=batch(12, 2))


def shared_vector(model):
    return {name: p for name, p in model.named_parameters() if name in model.shared_names()}


def directional_derivative(function, params, direction, eps=1e-6):
    """Central difference of ``function`` along ``direction`` (params moved in place, then restored)."""

    def shifted(amount):
        with torch.no_grad():
            for name, p in params.items():
                p.add_(amount * direction[name])
        try:
            return function()
        finally:
            with torch.no_grad():
                for name, p in params.items():
                    p.sub_(amount * direction[name])

    return (shifted(eps) - shifted(-eps)) / (2 * eps)


def random_direction(params, seed):
    """A random direction over the shared tensors, zero on the codebook.

    The codebook's gradient through the quantized values is the straight-through
    estimator by design (tests/test_vq.py), which finite differences do not see.
    """
    generator = torch.Generator().manual_seed(seed)
    return {
        name: torch.zeros_like(p) if name == "quantizer.codebooks" else torch.randn(
            p.shape, generator=generator, dtype=p.dtype
        )
        for name, p in params.items()
    }


@pytest.mark.parametrize("inner_steps", [1, 2])
def test_second_order_meta_gradient_matches_finite_differences(inner_steps):
    model = tiny_model()
    config = MetaConfig(order="second", inner_steps=inner_steps, inner_lr=0.5)
    theta = shared_vector(model)
    result = run_task(model, "t", TASK, config)
    for seed in range(3):
        direction = random_direction(theta, seed)
        analytic = sum(float((result.meta_gradient[n] * direction[n]).sum()) for n in theta)
        numeric = directional_derivative(lambda: run_task(model, "t", TASK, config).query_loss, theta, direction)
        assert analytic == pytest.approx(numeric, rel=1e-5, abs=1e-8)


def test_first_order_meta_gradient_is_the_query_gradient_at_the_adapted_parameters():
    model = tiny_model()
    config = MetaConfig(order="first", inner_steps=2, inner_lr=0.5)
    theta = shared_vector(model)
    result = run_task(model, "t", TASK, config)
    query = TASK.query
    with torch.no_grad():  # move theta to phi = theta + adaptation
        for name, p in theta.items():
            p.add_(result.adaptation[name])

    def query_loss():
        return model("t", torch.as_tensor(query.inputs), torch.as_tensor(query.targets)).loss.item()

    assert query_loss() == pytest.approx(result.query_loss, rel=1e-12)
    direction = random_direction(theta, 7)
    analytic = sum(float((result.meta_gradient[n] * direction[n]).sum()) for n in theta)
    assert analytic == pytest.approx(directional_derivative(query_loss, theta, direction), rel=1e-5)


def test_one_inner_step_adapts_by_the_support_gradient():
    model = tiny_model()
    config = MetaConfig(inner_steps=1, inner_lr=0.3)
    support = TASK.support
    loss = model("a", torch.as_tensor(support.inputs), torch.as_tensor(support.targets)).loss
    names = model.shared_names()
    gradients = torch.autograd.grad(loss, [dict(model.named_parameters())[n] for n in names], allow_unused=True)
    result = run_task(model, "t", TASK, config)
    for name, gradient in zip(names, gradients):
        expected = torch.zeros_like(result.adaptation[name]) if gradient is None else -0.3 * gradient
        assert torch.allclose(result.adaptation[name], expected, atol=1e-12)


def test_learned_inner_rate_gets_the_first_order_hypergradient():
    model = tiny_model()
    config = MetaConfig(inner_steps=1, inner_lr=0.3, learned_inner_lr=True)
    rates = initial_inner_lrs(model, config)
    result = run_task(model, "t", TASK, config, rates)
    # phi = theta - rate * g_s  =>  dL_q/d rate = -<g_q(phi), g_s> = <g_q, adaptation> / rate
    for index, name in enumerate(model.shared_names()):
        expected = float((result.meta_gradient[name] * result.adaptation[name]).sum()) / 0.3
        assert float(result.inner_lr_gradient[index]) == pytest.approx(expected, rel=1e-9, abs=1e-15)


def test_weights_are_a_distribution_that_prefers_the_aligned_source():
    config = MetaConfig(temperature=0.1)
    g = {"w": torch.tensor([1.0, 0.0, 0.0])}
    aligned = {"w": torch.tensor([-2.0, 0.1, 0.0])}  # moves down the target gradient
    opposed = {"w": torch.tensor([2.0, 0.0, 0.3])}
    sims = torch.tensor([task_similarity(aligned, g, config), task_similarity(opposed, g, config)])
    assert sims[0] > 0.9 and sims[1] < -0.9
    weights = task_weights(sims, config)
    assert float(weights.sum()) == pytest.approx(1.0)
    assert weights[0] > 0.99
    flipped = task_weights(
        torch.tensor([task_similarity(x, g, config.model_copy(update={"sign": "gradient"}))
                      for x in (aligned, opposed)]),
        config,
    )
    assert flipped[1] > flipped[0]


def test_high_temperature_and_uniform_weighting_give_equal_weights():
    sims = torch.tensor([0.9, -0.5, 0.1])
    hot = task_weights(sims, MetaConfig(temperature=1e9))
    assert torch.allclose(hot, torch.full((3,), 1 / 3, dtype=torch.float64))
    uniform = torch.full((3,), 1 / 3, dtype=torch.float64)
    assert torch.equal(task_weights(sims, MetaConfig(weighting="uniform")), uniform)


def test_centering_removes_what_every_task_adapts_alike():
    """A large shared direction hides which task helps; centering compares what differs."""
    g = {"w": torch.tensor([0.0, 1.0, 0.0])}  # the target descends along -y
    common = torch.tensor([10.0, 0.0, 0.0])  # every source moves theta along x, which the target ignores
    helpful = {"w": common + torch.tensor([0.0, -1.0, 0.0])}
    useless = {"w": common + torch.tensor([0.0, 0.0, 1.0])}
    harmful = {"w": common + torch.tensor([0.0, 1.0, 0.0])}
    tasks = [helpful, useless, harmful]
    plain = [task_similarity(a, g, MetaConfig()) for a in tasks]
    assert max(plain) - min(plain) < 0.2  # all near 0: the shared x dominates every cosine
    centred = centered(tasks, LOCAL)
    assert torch.allclose(sum(a["w"] for a in centred), torch.zeros(3), atol=1e-6)
    similarities = [task_similarity(a, g, MetaConfig()) for a in centred]
    assert similarities[0] > 0.5 > similarities[1] > -0.5 > similarities[2]


def test_the_running_direction_averages_the_steps_mean_task_gradient_over_steps():
    direction = RunningDirection(decay=0.75)
    assert torch.equal(direction.update({"w": torch.tensor([4.0, 0.0])})["w"], torch.tensor([4.0, 0.0]))
    assert torch.equal(direction.update({"w": torch.tensor([0.0, 4.0])})["w"], torch.tensor([3.0, 1.0]))
    restored = RunningDirection(decay=0.75)
    restored.load_state_dict(direction.state_dict())
    assert torch.equal(restored.value["w"], torch.tensor([3.0, 1.0]))


def test_with_the_running_direction_every_task_is_compared_with_the_mean_target_gradient():
    """Not with its own g_i: s_i = cos(phi_i - theta, -mean_j g_j) at the first step."""
    model = tiny_model()
    config = MetaConfig(tasks_per_step=2, inner_lr=0.2, temperature=0.5, direction="running_mean")
    tasks = [TASK, TaskBatch("b", support=batch(9, 3), query=batch(12, 4))]
    results = [run_task(model, "t", task, config) for task in tasks]
    mean = {name: (results[0].meta_gradient[name] + results[1].meta_gradient[name]) / 2
            for name in model.shared_names()}
    expected = task_weights(torch.tensor([task_similarity(r.adaptation, mean, config) for r in results]), config)
    own = task_weights(torch.tensor([task_similarity(r.adaptation, r.meta_gradient, config) for r in results]),
                       config)
    assert not torch.allclose(expected, own, atol=1e-4)  # the test tells the two apart

    direction = RunningDirection(config.direction_decay)
    log = meta_step(model, torch.optim.SGD(model.parameters(), lr=0.1), "t", tasks, config, direction=direction)
    assert log.weights == pytest.approx([float(w) for w in expected], abs=1e-6)
    assert all(torch.allclose(direction.value[name], mean[name]) for name in mean)
    with pytest.raises(ValueError, match="RunningDirection"):
        meta_step(model, torch.optim.SGD(model.parameters(), lr=0.1), "t", tasks, config)


def test_per_tensor_cosine_averages_over_tensors():
    config = MetaConfig(similarity="per_tensor_cosine")
    adaptation = {"x": torch.tensor([1.0, 0.0]), "y": torch.tensor([0.0, 100.0])}
    gradient = {"x": torch.tensor([-1.0, 0.0]), "y": torch.tensor([0.0, 100.0])}
    assert task_similarity(adaptation, gradient, config) == pytest.approx(0.0)  # (1 + -1) / 2
    assert task_similarity(adaptation, gradient, MetaConfig()) == pytest.approx(-(1e4 - 1) / (1e4 + 1))


def test_combine_is_the_weighted_sum_over_tasks():
    grads = [{"w": torch.tensor([1.0, 2.0])}, {"w": torch.tensor([3.0, -1.0])}]
    combined = combine(grads, torch.tensor([0.25, 0.75]))
    assert torch.allclose(combined["w"], torch.tensor([2.5, -0.25]))


def test_meta_step_applies_the_weighted_meta_gradient_with_the_optimizer():
    model = tiny_model()
    config = MetaConfig(tasks_per_step=2, inner_lr=0.2, temperature=0.5)
    tasks = [TASK, TaskBatch("b", support=batch(9, 3), query=batch(12, 4))]
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    results = [run_task(model, "t", task, config) for task in tasks]
    similarities = torch.tensor([task_similarity(r.adaptation, r.meta_gradient, config) for r in results])
    weights = task_weights(similarities, config)
    expected = combine([r.meta_gradient for r in results], weights)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    log = meta_step(model, optimizer, "t", tasks, config)
    assert log.weights == pytest.approx([float(w) for w in weights])
    after = dict(model.named_parameters())
    for name in model.shared_names():
        assert torch.allclose(after[name], before[name] - 0.1 * expected[name], atol=1e-12)
    # Each source's own table moved by its support gradient; the target's by the query losses.
    assert not torch.equal(after["domains.a.embedding.weight"], before["domains.a.embedding.weight"])
    assert not torch.equal(after["domains.b.embedding.weight"], before["domains.b.embedding.weight"])
    assert not torch.equal(after["domains.t.embedding.weight"], before["domains.t.embedding.weight"])


def test_source_gradient_weight_adds_the_support_gradient_to_the_update():
    from metarec_dist.meta.step import task_update

    model = tiny_model()
    config = MetaConfig(inner_steps=1, inner_lr=0.3, source_gradient_weight=0.5)
    result = run_task(model, "t", TASK, config)
    support = TASK.support
    loss = model("a", torch.as_tensor(support.inputs), torch.as_tensor(support.targets)).loss
    names = model.shared_names()
    gradients = torch.autograd.grad(loss, [dict(model.named_parameters())[n] for n in names], allow_unused=True)
    update = task_update(result, config).meta_gradient
    for name, gradient in zip(names, gradients):
        support_gradient = torch.zeros_like(update[name]) if gradient is None else gradient
        assert torch.allclose(update[name], result.meta_gradient[name] + 0.5 * support_gradient, atol=1e-10)
    assert task_update(result, MetaConfig()).meta_gradient is result.meta_gradient


def test_with_source_gradients_the_aligned_source_weighs_more_and_the_update_lowers_the_target_loss():
    """Two sources with the target's own items: one trained on the target's batch (its gradients point
    where the target's do), one on the same sequences backwards (it teaches the opposite order). The
    update of theta is sum_i w_i (g_i + lambda s_i), s_i the source's support gradient at theta, g_i the
    target's query gradient at phi_i = theta - inner_lr s_i, w = softmax(cos(s_i, g_i) / temperature):
    checked against that formula computed here, and it lowers the target's loss."""
    from torch.func import functional_call

    from metarec_dist.data.batches import NextItemBatch

    torch.manual_seed(0)
    config = ModelConfig(width=8, item_width=6, encoder=EncoderConfig(layers=1, heads=2, max_length=5, dropout=0.0),
                         vq={"num_codebooks": 2, "codewords": 6})
    model = SequenceRecommender(config, {"t": 12, "aligned": 12, "opposed": 12}).double()
    for source in ("aligned", "opposed"):
        model.domains[source].load_state_dict(model.domains["t"].state_dict())
    query = random_batch(12, 2, rows=6, leading_padding=0)
    backwards = query.inputs[:, ::-1].copy()
    opposed = NextItemBatch(backwards[:, :-1].copy(), backwards[:, 1:].copy())  # each item predicts its predecessor
    tasks = [TaskBatch("aligned", support=query, query=query), TaskBatch("opposed", support=opposed, query=query)]
    meta = MetaConfig(tasks_per_step=2, inner_lr=0.1, temperature=0.1, source_gradient_weight=1.0)

    names = model.shared_names()
    parameters = dict(model.named_parameters())
    theta = {name: parameters[name].detach().clone().requires_grad_() for name in names}

    def gradient_at(shared, domain, batch):
        loss = functional_call(model, {**parameters, **shared},
                               (domain, torch.as_tensor(batch.inputs), torch.as_tensor(batch.targets))).loss
        found = torch.autograd.grad(loss, [shared[name] for name in names], allow_unused=True)
        return [torch.zeros_like(theta[name]) if g is None else g for name, g in zip(names, found)]

    similarities, updates = [], []
    for task in tasks:
        support = gradient_at(theta, task.source, task.support)
        phi = {name: (theta[name] - 0.1 * s).detach().requires_grad_() for name, s in zip(names, support)}
        query_gradient = gradient_at(phi, "t", task.query)
        flat_s, flat_g = torch.cat([s.flatten() for s in support]), torch.cat([g.flatten() for g in query_gradient])
        similarities.append(torch.nn.functional.cosine_similarity(flat_s, flat_g, dim=0))
        updates.append([g + 1.0 * s for g, s in zip(query_gradient, support)])
    weights = torch.softmax(torch.stack(similarities) / 0.1, dim=0)
    expected = [sum(w * update[index] for w, update in zip(weights, updates)) for index in range(len(names))]

    def target_loss():
        with torch.no_grad():
            return float(model("t", torch.as_tensor(query.inputs), torch.as_tensor(query.targets)).loss)

    before = target_loss()
    log = meta_step(model, torch.optim.SGD(model.parameters(), lr=0.05), "t", tasks, meta)
    assert log.weights == pytest.approx(weights.tolist(), abs=1e-7)  # adaptation: phi - theta, rounded
    assert log.weights[0] > 0.6 > 0.4 > log.weights[1]  # the aligned source counts more
    for name, update in zip(names, expected):
        assert torch.allclose(parameters[name], theta[name] - 0.05 * update, atol=1e-10), name
    assert target_loss() < before
