"""RowSparseAdam: a row-sparse gradient updates its rows exactly as Adam would and nothing else."""

import pytest
import torch
import torch.nn.functional as F

from metarec_dist.meta.row_sparse_adam import RowSparseAdam, empty_row_gradient


def steps(optimizer, table, rows_per_step, sparse):
    for rows in rows_per_step:
        optimizer.zero_grad()
        F.embedding(torch.tensor(rows), table, sparse=sparse).pow(2).sum().backward()
        optimizer.step()


def test_row_sparse_updates_equal_dense_adam_on_the_touched_rows_and_leave_the_rest_and_their_state():
    torch.manual_seed(0)
    dense = torch.nn.Parameter(torch.randn(12, 4))
    sparse = torch.nn.Parameter(dense.detach().clone())
    start = dense.detach().clone()
    dense_adam = torch.optim.Adam([dense], lr=0.1)
    sparse_adam = RowSparseAdam([sparse], lr=0.1)
    # The same rows every step (repeated within a step): lazy Adam equals Adam on them; a row skipped
    # for a step would keep still where Adam's momentum moves it.
    touched = [[1, 3, 3, 7], [7, 1, 3], [3, 3, 1, 7]]
    steps(dense_adam, dense, touched, sparse=False)
    steps(sparse_adam, sparse, touched, sparse=True)
    assert sparse.grad.is_sparse
    rows, others = torch.tensor([1, 3, 7]), torch.tensor([0, 2, 4, 5, 6, 8, 9, 10, 11])
    assert torch.allclose(sparse[rows], dense[rows], atol=1e-6) and not torch.equal(sparse[rows], start[rows])
    assert torch.equal(sparse[others], start[others])
    state, dense_state = sparse_adam.state[sparse], dense_adam.state[dense]
    assert set(state) == set(dense_state) and float(state["step"]) == float(dense_state["step"]) == 3
    for key in ("exp_avg", "exp_avg_sq"):
        assert torch.allclose(state[key][rows], dense_state[key][rows], atol=1e-7)
        assert torch.equal(state[key][others], torch.zeros(len(others), 4))


def test_weight_decay_applies_to_the_touched_rows_only():
    torch.manual_seed(1)
    dense = torch.nn.Parameter(torch.randn(6, 3))
    sparse = torch.nn.Parameter(dense.detach().clone())
    start = dense.detach().clone()
    steps(torch.optim.Adam([dense], lr=0.05, weight_decay=0.1), dense, [[2, 4]] * 3, sparse=False)
    steps(RowSparseAdam([sparse], lr=0.05, weight_decay=0.1), sparse, [[2, 4]] * 3, sparse=True)
    assert torch.allclose(sparse[[2, 4]], dense[[2, 4]], atol=1e-6)
    assert torch.equal(sparse[[0, 1, 3, 5]], start[[0, 1, 3, 5]])  # dense Adam decays these, lazy Adam does not
    assert not torch.allclose(dense[[0, 1, 3, 5]], start[[0, 1, 3, 5]])


def test_dense_gradients_take_torch_adams_step_exactly():
    torch.manual_seed(2)
    a = torch.nn.Parameter(torch.randn(5, 3))
    b = torch.nn.Parameter(a.detach().clone())
    steps(torch.optim.Adam([a], lr=0.1), a, [[0, 1], [2]], sparse=False)
    steps(RowSparseAdam([b], lr=0.1), b, [[0, 1], [2]], sparse=False)
    assert torch.equal(a, b)


def test_an_empty_row_gradient_changes_nothing():
    table = torch.nn.Parameter(torch.randn(4, 2))
    before = table.detach().clone()
    optimizer = RowSparseAdam([table], lr=0.1)
    table.grad = empty_row_gradient(table)
    optimizer.step()
    assert torch.equal(table, before)


def test_amsgrad_is_refused():
    table = torch.nn.Parameter(torch.randn(4, 2))
    optimizer = RowSparseAdam([table], amsgrad=True)
    table.grad = torch.ones(4, 2)
    with pytest.raises(ValueError, match="amsgrad"):
        optimizer.step()
