import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch_geometric.data import Batch

from wsigraph.data.graph import build_slide_graph
from wsigraph.data.readers import SlideLevel
from wsigraph.data.schema import node_batch
from wsigraph.models import ZoomMIL, build_model

DIM = 8
SIZES = {5: 1024, 10: 512, 20: 256}
LEVELS = ["patch_5x", "patch_10x", "patch_20x"]


def make_slide(low_cols, low_rows, seed, origin=(37, 11), drop_high=(), label=0, shuffle=True):
    r"""A 5x/10x/20x slide: a complete grid of low_cols x low_rows 5x patches (4x4 20x patches
    each) minus the 20x patches ``drop_high``; rows of every level shuffled (file order is free)."""
    rng = np.random.default_rng(seed)
    xs, ys = np.meshgrid(np.arange(4 * low_cols), np.arange(4 * low_rows))
    high = np.stack([xs.ravel(), ys.ravel()], 1)
    high = np.delete(high, list(drop_high), axis=0)
    levels = []
    for mag, size in SIZES.items():
        cells = np.unique(high * 256 // size, axis=0)
        if shuffle:
            cells = cells[rng.permutation(len(cells))]
        coords = cells * size + np.asarray(origin)
        levels.append(SlideLevel(float(mag), rng.normal(size=(len(coords), DIM)).astype(np.float32),
                                 coords.astype(np.int64), float(size), f"{mag}x.h5"))
    return build_slide_graph(levels, f"s{seed}", f"c{seed}", label=label)


def node_of_cell(graph, level, size):
    cells = ((graph[level].pos - torch.tensor([37.0, 11.0])) / size).long()
    return {(int(c), int(r)): i for i, (c, r) in enumerate(cells.tolist())}


def depth_first_order(graph, root_order, official):
    r"""Node orders of the 10x and 20x levels: the descendants of the 5x nodes in ``root_order``,
    depth-first, children (dx, dy) column-major as the official preprocessing
    (``_0_0, _1_0, _0_1, _1_1`` over (h, w)) or in our raster slot order."""
    lookups = [node_of_cell(graph, LEVELS[i], SIZES[m]) for i, m in enumerate((5, 10, 20))]
    cells_of_root = {v: k for k, v in lookups[0].items()}
    offsets = [(0, 0), (0, 1), (1, 0), (1, 1)] if official else [(0, 0), (1, 0), (0, 1), (1, 1)]  # (dx, dy)
    mid, high = [], []
    for node in root_order:
        c, r = cells_of_root[node]
        for dx, dy in offsets:
            mc, mr = 2 * c + dx, 2 * r + dy
            mid.append(lookups[1][(mc, mr)])
            for ex, ey in offsets:
                high.append(lookups[2][(2 * mc + ex, 2 * mr + ey)])
    return torch.tensor(mid), torch.tensor(high)


def gated(module, h):
    return module.lin_score(torch.tanh(module.lin_tanh(h)) * torch.sigmoid(module.lin_gate(h))).squeeze(-1)


class DenseOfficialTopK(torch.autograd.Function):
    r"""The official formulation: dense [B, S, k, N] one-hots and the diagonal estimator."""

    @staticmethod
    def forward(ctx, scores, k, sigma, noise):
        position = torch.topk(scores.unsqueeze(1) + sigma * noise, k, dim=-1).indices.sort(dim=-1).values
        onehots = F.one_hot(position, scores.size(-1)).float()
        ctx.save_for_backward(onehots, noise)
        ctx.sigma = sigma
        return onehots.mean(dim=1)

    @staticmethod
    def backward(ctx, grad):
        onehots, noise = ctx.saved_tensors
        jacobian = torch.einsum("bskn,bsn->bkn", onehots, noise) / (noise.size(1) * ctx.sigma)
        return torch.einsum("bkn,bkn->bn", grad, jacobian), None, None, None


def reference_logits(model, x1, x2, x3, k, sigma=None, noises=None):
    r"""ZoomMIL's forward as in the official code: kron(T, I_r) on depth-first ordered bags."""
    encode = [lambda x, i=i: torch.relu(model.encoders[i][0](x)) for i in range(3)]

    def pool(i, h):
        return torch.softmax(gated(model.pools[i], h), 0) @ h

    def select(i, h, noise):
        probs = torch.softmax(gated(model.selectors[i], h), 0)
        kk = min(k, probs.numel())
        if noise is None:
            return F.one_hot(torch.topk(probs, kk).indices.sort().values, probs.numel()).float()
        return DenseOfficialTopK.apply(probs[None], kk, sigma, noise[:, :, :probs.numel()])[0]

    h1 = encode[0](x1)
    m1 = pool(0, h1)
    t1 = select(0, h1, None if noises is None else noises[0])
    x2 = torch.kron(t1, torch.eye(4)) @ x2
    x3 = torch.kron(t1, torch.eye(16)) @ x3
    h2 = encode[1](x2)
    m2 = pool(1, h2)
    t2 = select(1, h2, None if noises is None else noises[1])
    x3 = torch.kron(t2, torch.eye(4)) @ x3
    m3 = pool(2, encode[2](x3))
    return model.classifier(m1 + m2 + m3)


def test_evaluation_equals_the_official_dense_formulation():
    graph = make_slide(5, 3, seed=0)
    x = [graph[level].x for level in LEVELS]
    for k in (2, 6, 40):  # 40 > 15 patches at 5x: every patch is selected
        torch.manual_seed(k)
        model = build_model("zoommil", in_channels=DIM, num_classes=3, hidden_channels=16, attention_channels=8,
                            k=k).eval()
        cells = node_of_cell(graph, "patch_5x", 1024)
        root_order = [cells[key] for key in sorted(cells, key=lambda cr: (cr[1], cr[0]))]  # row-major (h, w)
        mid, high = depth_first_order(graph, root_order, official=True)
        with torch.no_grad():
            expected = reference_logits(model, x[0][root_order], x[1][mid], x[2][high], k)
            output = model(graph)
        torch.testing.assert_close(output.logits[0], expected, atol=1e-5, rtol=1e-5)
        selected = output.interpretation["patch_5x"]["selected"]
        assert int(selected.sum()) == min(k, 15)
        assert int(output.interpretation["patch_10x"]["reached"].sum()) == 4 * min(k, 15)
        assert int(output.interpretation["patch_20x"]["reached"].sum()) == 4 * min(k, 60)


@pytest.mark.parametrize("estimator", ["diagonal"])
def test_training_forward_and_gradient_equal_the_official_formulation(estimator):
    # Same noise, dropout 0: our sparse perturbed top-k + zoom gather equals the official dense
    # one-hots + kron, in value and in gradient (child order: our raster slots).
    graph = make_slide(4, 2, seed=1)
    k, sigma, samples = 3, 0.05, 100
    torch.manual_seed(0)
    model = build_model("zoommil", in_channels=DIM, num_classes=2, hidden_channels=16, attention_channels=8,
                        dropout=0.0, k=k, sigma=sigma, num_samples=samples, estimator=estimator).train()
    reference = copy.deepcopy(model)
    model.topk.generator = torch.Generator().manual_seed(7)
    output = model(graph)
    target = torch.randn(2)
    (output.logits[0] * target).sum().backward()

    generator = torch.Generator().manual_seed(7)
    n1 = graph["patch_5x"].num_nodes
    noises = [torch.randn(1, samples, n1, generator=generator), torch.randn(1, samples, k * 4, generator=generator)]
    mid, high = depth_first_order(graph, list(range(n1)), official=False)
    x = [graph[level].x for level in LEVELS]
    expected = reference_logits(reference, x[0], x[1][mid], x[2][high], k, sigma, noises)
    (expected * target).sum().backward()
    torch.testing.assert_close(output.logits[0], expected.detach(), atol=1e-5, rtol=1e-5)
    for (name, ours), theirs in zip(model.named_parameters(), reference.parameters()):
        assert (ours.grad is None) == (theirs.grad is None), name
        if ours.grad is not None:
            torch.testing.assert_close(ours.grad, theirs.grad, atol=1e-5, rtol=1e-4, msg=name)
    assert model.selectors[0].lin_score.weight.grad.abs().sum() > 0  # the selection head learns


def holed_slides():
    # Missing 20x children (background), a whole missing 10x child, offset lattices, a tiny slide.
    return [make_slide(3, 2, seed=2, drop_high=[0, 1, 5, 17, 40, 41, 42, 43, 52, 53, 54, 55], label=1),
            make_slide(2, 2, seed=3, origin=(500, 300), drop_high=[3, 9], label=0),
            make_slide(1, 1, seed=4, drop_high=[0, 1, 4, 5, 15], label=1)]


@pytest.mark.parametrize("options", [{}, {"k": 50}, {"num_levels": 2}, {"levels": ["patch_5x", "patch_20x"]},
                                     {"missing_children": "zero"}, {"classifier_hidden": 8}])
def test_batched_evaluation_equals_per_slide(options):
    slides = holed_slides()
    torch.manual_seed(5)
    model = build_model("zoommil", in_channels=DIM, num_classes=3, hidden_channels=16, attention_channels=8,
                        k=options.pop("k", 3), **options).eval()
    batch = Batch.from_data_list([copy.copy(s) for s in slides])
    with torch.no_grad():
        output = model(batch)
        for i, slide in enumerate(slides):
            alone = model(slide)
            torch.testing.assert_close(output.logits[i], alone.logits[0], atol=1e-6, rtol=1e-5)
            for level, values in alone.interpretation.items():
                mask = node_batch(batch, level) == i
                for name, value in values.items():
                    torch.testing.assert_close(output.interpretation[level][name][mask], value)


def test_missing_children_never_receive_attention():
    slides = holed_slides()
    batch = Batch.from_data_list([copy.copy(s) for s in slides])
    torch.manual_seed(6)
    model = build_model("zoommil", in_channels=DIM, num_classes=2, hidden_channels=16, attention_channels=8, k=2)
    for mode in ("eval", "train"):
        getattr(model, mode)()
        output = model(batch)
        for level in LEVELS:
            attention = output.interpretation[level]["attention"].detach()
            per_slide = torch.zeros(3).index_add_(0, node_batch(batch, level), attention)
            if mode == "eval" or level == "patch_5x":
                # All attention lands on existing nodes: one per slide and level.
                torch.testing.assert_close(per_slide, torch.ones(3))
            if level != "patch_5x":
                reached = output.interpretation[level]["reached"]
                assert (attention[~reached] == 0).all()
    zoomed = ZoomMIL(DIM, 2, hidden_channels=16, attention_channels=8, k=1, num_levels=2).eval()
    with torch.no_grad():
        alone = zoomed(slides[2])  # three 10x patches, one of them with 3 of its 4 children
    assert int(alone.interpretation["patch_20x"]["reached"].sum()) in (3, 4)
    torch.testing.assert_close(alone.interpretation["patch_20x"]["attention"].sum(), torch.tensor(1.0))
    # Zero filling (the public ports): missing children are zero vectors that take attention.
    zero = build_model("zoommil", in_channels=DIM, num_classes=2, hidden_channels=16, attention_channels=8, k=6,
                       missing_children="zero").eval()
    with torch.no_grad():
        out = zero(slides[0])
    assert out.interpretation["patch_20x"]["attention"].sum() < 1.0 - 1e-4


def test_levels_and_errors():
    graph = make_slide(2, 1, seed=8)
    eff = build_model("zoommil", in_channels=DIM, num_classes=2, num_levels=2).eval()
    with torch.no_grad():
        out = eff(graph)
    assert set(out.interpretation) == {"patch_10x", "patch_20x"}
    assert eff.resolve_levels(LEVELS) == ["patch_10x", "patch_20x"]
    assert "num_levels=2" in repr(eff)
    skip = ZoomMIL(DIM, 2, levels=["patch_20x", "patch_5x"])
    assert skip.resolve_levels(LEVELS) == ["patch_5x", "patch_20x"]
    with pytest.raises(KeyError, match="patch_40x"):
        ZoomMIL(DIM, 2, levels=["patch_5x", "patch_40x"]).eval()(graph)
    with pytest.raises(ValueError, match="at least two"):
        ZoomMIL(DIM, 2, num_levels=1)
    with pytest.raises(ValueError, match="only"):
        ZoomMIL(DIM, 2, num_levels=4).eval()(graph)
    with pytest.raises(RuntimeError, match="eval"):
        ZoomMIL(DIM, 2).train().lazy_forward(None)


def test_training_step_reaches_every_head():
    slides = holed_slides()
    batch = Batch.from_data_list([copy.copy(s) for s in slides])
    torch.manual_seed(9)
    for estimator in ("diagonal", "full"):
        model = build_model("zoommil", in_channels=DIM, num_classes=2, hidden_channels=16, attention_channels=8, k=2,
                            sigma=0.05, estimator=estimator).train()
        output = model(batch)
        loss = model.loss(output, batch.y)
        loss.backward()
        for name, parameter in model.named_parameters():
            assert parameter.grad is not None and torch.isfinite(parameter.grad).all(), name
        for selector in model.selectors:
            assert selector.lin_score.weight.grad.abs().sum() > 0


def test_config_builds_the_official_recipe():
    from pathlib import Path

    from wsigraph.train import load_experiment_config, model_from_config, resolve_config
    config = resolve_config(load_experiment_config(Path(__file__).resolve().parents[2] / "configs" / "zoommil.yaml"))
    model = model_from_config(config["model"], in_channels=DIM, num_classes=3)
    assert isinstance(model, ZoomMIL) and model.topk.k == 12 and model.topk.num_samples == 100
    assert model.topk.sigma == 0.002 and model.topk.estimator == "diagonal" and model.num_levels == 3
    train = config["train"]
    assert (train["optimizer"], train["lr"], train["weight_decay"], train["scheduler"]) == ("adam", 1e-4, 0.0, "plateau")
    assert (train["plateau_factor"], train["plateau_patience"], train["epochs"], train["batch_size"]) == (0.8, 5, 100, 1)
    assert train["class_weighted_sampling"] and train["monitor"] == "val_f1" and train["max_patches_train"] is None
    with torch.no_grad():
        assert torch.isfinite(model.eval()(make_slide(2, 2, seed=10)).logits).all()
