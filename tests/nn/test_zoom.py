import torch

from wsigraph.data.schema import child_slot
from wsigraph.nn import ZoomGather, ZoomStack
from wsigraph.nn.functional.perturbed_topk import TopKSelection, hard_topk, perturbed_topk
from wsigraph.nn.functional.zoom import cell_centre_distance, child_table, compose_child_tables, gather_rows


def test_child_table_fills_slots_and_marks_missing():
    parent = torch.tensor([0, 0, 1, 2, 2, 2])
    child = torch.tensor([5, 3, 4, 0, 1, 2])
    slot = torch.tensor([3, 0, 1, 0, 1, 2])
    table = child_table(parent, child, slot, num_parents=4, num_slots=4)
    assert table.tolist() == [[3, -1, -1, 5], [-1, 4, -1, -1], [0, 1, 2, -1], [-1, -1, -1, -1]]


def test_colliding_slots_keep_the_child_nearest_to_the_cell_centre():
    # A parent of side 512 at (0, 0) and children of side 256 on a lattice offset by 100 px
    # (centres at x = 228 and 428: columns 0 and 1); a child of a second, offset extraction at
    # x = 140 (centre 268) falls into column 1 too.
    parent_pos = torch.tensor([[0.0, 0.0]])
    child_pos = torch.tensor([[100.0, 0.0], [300.0, 0.0], [140.0, 0.0]])
    slot = child_slot(parent_pos.expand(3, 2), 512.0, child_pos, 256.0)
    assert slot.tolist() == [0, 1, 1]
    distance = cell_centre_distance(parent_pos.expand(3, 2), 512.0, child_pos, 256.0, slot)
    table = child_table(torch.zeros(3, dtype=torch.long), torch.arange(3), slot, 1, 4, distance)
    # Cell 1 spans x in [256, 512), centre 384: child 1's centre 428 (44 px) beats child 2's 268 (116 px).
    assert table.tolist() == [[0, 1, -1, -1]]
    # Without distances the lower child index wins; the result is independent of edge order.
    perm = torch.tensor([2, 1, 0])
    assert child_table(torch.zeros(3, dtype=torch.long), perm, slot[perm], 1, 4).tolist() == [[0, 1, -1, -1]]
    assert child_table(torch.zeros(3, dtype=torch.long), perm, slot[perm], 1, 4, distance[perm]).tolist() == \
        [[0, 1, -1, -1]]


def test_compose_is_depth_first():
    first = torch.tensor([[0, 2], [-1, 1]])
    second = torch.tensor([[10, 11], [12, -1], [14, 15]])
    assert compose_child_tables(first, second).tolist() == [[10, 11, 14, 15], [-1, -1, 12, -1]]
    assert gather_rows(torch.arange(6.0).view(3, 2), torch.tensor([[2, -1]])).tolist() == [[[4.0, 5.0], [0.0, 0.0]]]


def random_stack(batch_size=2, entries=5, descendants=4, dim=3, missing="mask"):
    index = torch.arange(batch_size * entries * descendants).view(batch_size, entries, descendants)
    index[0, 1, 2] = -1
    index[1, 3] = -1
    valid = torch.ones(batch_size, entries, dtype=torch.bool)
    valid[1, 4] = False
    index[1, 4] = -1
    x = torch.randn(index.numel(), dim)
    return ZoomGather(missing).root(index, valid, x), x


def test_soft_gather_is_the_kron_product_on_a_complete_stack():
    # With every child present, the soft gather is the official (T ⊗ I_R) X.
    batch_size, entries, fanout, dim = 2, 5, 4, 3
    index = torch.arange(batch_size * entries * fanout).view(batch_size, entries, fanout)
    x = torch.randn(index.numel(), dim)
    zoom = ZoomGather()
    stack = zoom.root(index, torch.ones(batch_size, entries, dtype=torch.bool), x)
    selection = perturbed_topk(torch.randn(batch_size, entries), 3, num_samples=20, sigma=0.5)
    bag = zoom.bag(zoom(selection, stack))
    for b in range(batch_size):
        expected = torch.kron(selection.weights[b], torch.eye(fanout)) @ x[index[b].reshape(-1)]
        torch.testing.assert_close(bag.features[b], expected)
    torch.testing.assert_close(bag.log_prior, torch.zeros_like(bag.log_prior), atol=1e-6, rtol=0)


def test_soft_gather_masks_missing_children():
    stack, x = random_stack()
    zoom = ZoomGather("mask")
    weights = torch.zeros(2, 2, 5)
    weights[0, 0, 1] = 0.5
    weights[0, 0, 2] = 0.5           # slot 0 mixes entries 1 and 2 of slide 0
    weights[0, 1, 4] = 1.0
    weights[1, 0, 3] = 1.0           # an entry without children
    selection = TopKSelection(torch.tensor([[1, 4], [3, -1]]), torch.tensor([[True, True], [True, False]]), weights)
    bag = zoom.bag(zoom(selection, stack))
    # Child 2 of entry 1 is missing: that mixture keeps only entry 2's child, with half the mass.
    torch.testing.assert_close(bag.features[0, 2], x[stack.index[0, 2, 2]])
    torch.testing.assert_close(bag.log_prior[0, 2], torch.log(torch.tensor(0.5)))
    torch.testing.assert_close(bag.features[0, 0], 0.5 * (x[stack.index[0, 1, 0]] + x[stack.index[0, 2, 0]]))
    # No parent with the child, or an unused slot: not present.
    assert not bag.present[1].any() and torch.isinf(bag.log_prior[1]).all()
    # The most probable parent's children are the interpretation index.
    assert bag.index[0, :4].tolist() == stack.index[0, 1].tolist()
    # Zero filling: missing children are zero vectors that take part.
    zero_bag = ZoomGather("zero").bag(ZoomGather("zero")(selection, random_stack(missing="zero")[0]))
    assert zero_bag.present[0].all() and zero_bag.present[1, :4].all() and not zero_bag.present[1, 4:].any()


def test_hard_gather_equals_soft_gather_of_one_hots_and_select_children():
    stack, x = random_stack()
    zoom = ZoomGather()
    selection = hard_topk(torch.randn(2, 5), 3, stack.valid)
    one_hot = torch.zeros(2, 3, 5)
    for b in range(2):
        for j in range(3):
            if selection.valid[b, j]:
                one_hot[b, j, selection.index[b, j]] = 1.0
    soft = zoom(selection._replace(weights=one_hot), stack, fanout=2)
    hard = zoom(selection, stack, fanout=2)
    assert soft.index.shape == (2, 6, 2)
    assert torch.equal(soft.index, hard.index)
    torch.testing.assert_close(soft.feature_sum, hard.feature_sum)
    torch.testing.assert_close(soft.mass, hard.mass)
    # The evaluation path: children of the selected entries only.
    bag_index = torch.arange(10).view(2, 5)
    table = stack.index.reshape(10, 4)
    lookup = ZoomStack(table[bag_index], stack.valid)
    by_lookup = zoom.select_children(selection, bag_index, lambda parents: torch.where(
        (parents >= 0)[..., None], table[parents.clamp(min=0)], torch.tensor(-1)))
    assert torch.equal(by_lookup.index[..., 0], zoom(selection, lookup).index[..., 0])
    bag = zoom.bag(by_lookup)
    assert torch.equal(bag.present, bag.index >= 0)
