import copy
from pathlib import Path

import pytest
import torch
from torch_geometric.data import Batch

from conftest import nested_levels
from wsigraph.config import load_config
from wsigraph.data.graph import build_slide_graph
from wsigraph.data.schema import REGION, REGION_GRAPH, node_batch, region_of_patch
from wsigraph.models import build_model
from wsigraph.nn.functional import sinkhorn_log
from wsigraph.transforms import graph_transform

DIM = 12
NUM_CLASSES = 2
TOP = "patch_20x"
# (columns, rows, origin, removed 20x patches): holes, an offset lattice, a two-patch slide.
SLIDES = [(10, 8, (40, 13), [0, 5, 33, 34]), (5, 4, (0, 0), [7]), (2, 1, (300, 200), []),
          (12, 9, (900, 70), [3, 4, 50])]


def make_slide(cols, rows, origin, drop, seed, label, grid_size=4, knn=4):
    levels = nested_levels(cols, rows, origin, drop, seed, DIM)
    graph = build_slide_graph(levels, f"s{seed}", f"c{seed}", label=label)
    config = {"regions": {"strategy": "grid", "grid_size": grid_size}, "region_knn": knn, "patch_grid": False}
    return graph_transform(config)(graph)


@pytest.fixture(scope="module")
def slides():
    return [make_slide(*spec, seed=i, label=i % NUM_CLASSES) for i, spec in enumerate(SLIDES)]


def batch_of(graphs):
    return Batch.from_data_list([copy.copy(g) for g in graphs])


def reference_forward(model, graph, level=TOP):
    r"""ROAM on one slide written out densely: loops over regions and experts."""
    x = graph[level].x
    region = region_of_patch(graph, level)
    num_regions = graph[REGION].num_nodes
    h = model.projection(x)
    content = torch.stack([h[region == r].mean(0) if (region == r).any() else torch.zeros(h.size(1))
                           for r in range(num_regions)])
    mass = torch.stack([(region == r).sum() for r in range(num_regions)]).float()
    edge_index = graph[REGION_GRAPH].edge_index
    edge_weight = graph[REGION_GRAPH].edge_weight
    z = model.context(content, edge_index) if model.context is not None else content
    cost = 1 - torch.nn.functional.cosine_similarity(z[:, None, :], model.router.prototypes[None], dim=-1)
    a = mass / mass.sum()
    router = model.router
    if router.router == "softmax":
        plan = a[:, None] * torch.softmax(-cost / router.epsilon, dim=-1)
    else:
        plan = sinkhorn_log(cost[None], a[None], None, epsilon=router.epsilon,
                            num_iterations=router.sinkhorn.num_iterations, edge_index=edge_index,
                            edge_weight=edge_weight, smoothing=router.sinkhorn.smoothing,
                            smoothing_steps=router.sinkhorn.smoothing_steps)[0]
    dispatch = torch.zeros_like(plan)
    for r in range(num_regions):
        top = torch.sort(plan[r], descending=True, stable=True).indices[:router.top_k]  # ties: lower expert
        dispatch[r, top] = plan[r, top] * a[r] / plan[r, top].sum()
    pooling = model.expert_pooling
    scores = pooling.score(content)
    experts, present = [], []
    for e in range(model.num_experts):
        support = dispatch[:, e] > 0
        present.append(bool(support.any()))
        if not support.any():
            experts.append(torch.zeros(content.size(1)))
            continue
        logit = scores[support, e] + (torch.log(dispatch[support, e]) if model.ot_guided_pooling else 0)
        experts.append(torch.softmax(logit, 0) @ content[support])
    experts = torch.stack(experts)
    fusion = model.fusion
    gate = fusion.lin_score(torch.tanh(fusion.lin_tanh(experts)) * torch.sigmoid(fusion.lin_gate(experts)))
    present = torch.tensor(present)
    beta = torch.zeros(model.num_experts)
    beta[present] = torch.softmax(gate.squeeze(-1)[present], 0)
    return model.classifier(beta @ experts), plan, dispatch, beta


@pytest.mark.parametrize("options", [{}, {"routing_gnn": False}, {"smoothing": 0.0}, {"router": "softmax"},
                                     {"ot_guided_pooling": False}, {"detach_routing": True}])
def test_roam_matches_dense_reference(options, slides):
    torch.manual_seed(0)
    model = build_model("roam", in_channels=DIM, num_classes=NUM_CLASSES, hidden_channels=16,
                        attention_channels=8, **options).eval()
    batch = batch_of(slides)
    with torch.no_grad():
        output = model(batch)
        region_index = node_batch(batch, REGION)
        for i, graph in enumerate(slides):
            logits, plan, dispatch, beta = reference_forward(model, graph)
            rows = region_index == i
            torch.testing.assert_close(output.interpretation[REGION]["plan"][rows], plan, atol=1e-5, rtol=1e-4)
            torch.testing.assert_close(output.interpretation[REGION]["dispatch"][rows], dispatch,
                                       atol=1e-5, rtol=1e-4)
            torch.testing.assert_close(output.extras["expert_weights"][i], beta, atol=1e-5, rtol=1e-4)
            torch.testing.assert_close(output.logits[i], logits, atol=1e-5, rtol=1e-4)


def test_routing_outputs(slides):
    torch.manual_seed(1)
    model = build_model("roam", in_channels=DIM, num_classes=NUM_CLASSES).eval()
    batch = batch_of(slides)
    with torch.no_grad():
        output = model(batch)
    num_experts = model.num_experts
    assert float(output.aux_loss) == 0.0  # no load-balancing loss
    # Every expert gets 1/E of every slide before top-k; the dispatch keeps the slide's mass.
    assert (output.extras["plan_loads"] - 1.0 / num_experts).abs().max() < 1e-4
    torch.testing.assert_close(output.extras["loads"].sum(-1), torch.ones(len(slides)))
    region = output.interpretation[REGION]
    dispatch = region["dispatch"]
    assert ((dispatch > 0).sum(-1) <= 2).all()
    assert torch.equal(region["expert"], dispatch.argmax(-1))
    patch_expert = output.interpretation[TOP]["expert"]
    assert torch.equal(patch_expert, region["expert"][region_of_patch(batch, TOP)])
    region_slide = node_batch(batch, REGION)
    attention = torch.zeros(len(slides)).index_add_(0, region_slide, region["attention"])
    torch.testing.assert_close(attention, torch.ones(len(slides)))
    weights = output.extras["expert_weights"]
    torch.testing.assert_close(weights.sum(-1), torch.ones(len(slides)))
    assert torch.equal(weights > 0, output.extras["expert_mask"])
    # The two-patch slide has fewer regions than experts: some experts stay empty and get no weight.
    assert not output.extras["expert_mask"][2].all()


def test_capacity_constraint_against_softmax_routing(slides):
    # With one prototype nearest to every region, softmax routing sends it most of the mass;
    # OT routing still gives each expert 1/E.
    batch = batch_of(slides)
    loads = {}
    for router in ("ot", "softmax"):
        torch.manual_seed(2)
        model = build_model("roam", in_channels=DIM, num_classes=NUM_CLASSES, router=router,
                            routing_gnn=False).eval()
        with torch.no_grad():
            content = model.region_pooling(model.projection(batch[TOP].x), region_of_patch(batch, TOP),
                                           dim_size=batch[REGION].num_nodes)
            model.router.prototypes[3] = content.mean(0)
            assert (model.router.cost(content).argmin(-1) == 3).float().mean() > 0.9
            loads[router] = model(batch).extras["plan_loads"]
    assert (loads["softmax"][:, 3] > 0.5).all()
    assert (loads["ot"] - 1.0 / 8).abs().max() < 1e-4


@pytest.mark.parametrize("options", [{}, {"detach_routing": True}, {"ot_guided_pooling": False}])
def test_gradients_reach_the_router_only_through_the_dispatch(options, slides):
    torch.manual_seed(3)
    model = build_model("roam", in_channels=DIM, num_classes=NUM_CLASSES, **options).train()
    batch = batch_of(slides)
    output = model(batch)
    model.loss(output, batch.y).backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert all(torch.isfinite(g).all() for g in grads)
    prototype_grad = model.router.prototypes.grad
    routed = prototype_grad is not None and prototype_grad.abs().sum() > 0
    # log D in the expert attention is the router's only differentiable path to the loss.
    assert routed == (not options)
    assert model.classifier.weight.grad.abs().sum() > 0


def test_single_region_and_few_regions(slides):
    torch.manual_seed(4)
    graphs = [make_slide(*spec, seed=10 + i, label=i % 2, grid_size=1, knn=2) for i, spec in enumerate(SLIDES[:3])]
    graphs.append(slides[2])  # two regions, two patches
    batch = batch_of(graphs)
    assert batch[REGION].num_nodes == 5
    for top_k in (2, 20):
        model = build_model("roam", in_channels=DIM, num_classes=NUM_CLASSES, top_k=top_k).train()
        output = model(batch)
        assert torch.isfinite(output.logits).all()
        assert (output.extras["plan_loads"] - 1.0 / 8).abs().max() < 1e-4
        mask = output.extras["expert_mask"]
        assert (mask.sum(-1) <= min(top_k, 8) * torch.tensor([1, 1, 1, 2])).all()
        assert (output.extras["expert_weights"][~mask] == 0).all()
        model.loss(output, batch.y).backward()
        assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_lower_level_with_regions_without_patches(slides):
    torch.manual_seed(5)
    model = build_model("roam", in_channels=DIM, num_classes=NUM_CLASSES, level="patch_5x").eval()
    batch = batch_of(slides)
    with torch.no_grad():
        output = model(batch)
    region = region_of_patch(batch, "patch_5x")
    has_patches = torch.zeros(batch[REGION].num_nodes, dtype=torch.bool)
    has_patches[region] = True
    assert not has_patches.all()  # regions live at 20x; some hold no 5x patch
    expert = output.interpretation[REGION]["expert"]
    assert (expert[~has_patches] == -1).all() and (expert[has_patches] >= 0).all()
    assert output.interpretation[REGION]["plan"][~has_patches].abs().max() == 0
    assert (output.extras["plan_loads"] - 1.0 / 8).abs().max() < 1e-4
    assert torch.isfinite(output.logits).all()
    assert output.interpretation["patch_5x"]["expert"].shape[0] == batch["patch_5x"].num_nodes
    for i, graph in enumerate(slides):
        with torch.no_grad():
            torch.testing.assert_close(model(graph).logits, output.logits[i:i + 1], atol=1e-5, rtol=1e-4)


def test_missing_regions_are_reported(slides):
    model = build_model("roam", in_channels=DIM, num_classes=NUM_CLASSES)
    graph = copy.copy(slides[0])
    del graph[REGION_GRAPH]
    with pytest.raises(KeyError, match="region_knn"):
        model(graph)
    with pytest.raises(ValueError, match="router"):
        build_model("roam", in_channels=DIM, num_classes=NUM_CLASSES, router="topk")
    assert "router='softmax'" in repr(build_model("roam", in_channels=DIM, num_classes=2, router="softmax"))


def test_config_is_the_paper_recipe():
    config = load_config(Path(__file__).resolve().parents[2] / "configs" / "roam.yaml")
    model = config["model"]
    assert model["name"] == "roam"
    expected = {"hidden_channels": 256, "num_experts": 8, "top_k": 2, "router": "ot", "epsilon": 0.05,
                "num_iterations": 10, "smoothing": 0.5, "smoothing_steps": 3, "routing_gnn": True,
                "ot_guided_pooling": True, "detach_routing": False, "dropout": 0.25}
    assert {key: model[key] for key in expected} == expected
    assert config["graph"]["regions"] == {"strategy": "grid", "grid_size": 8}
    assert config["graph"]["region_knn"] == 8
    train = config["train"]
    assert (train["optimizer"], train["scheduler"], train["warmup_epochs"], train["grad_clip"]) == \
        ("adamw", "cosine", 5, 1.0)
    assert (train["epochs"], train["early_stopping_patience"], train["max_patches_train"]) == (200, 20, 4096)
    built = build_model("roam", in_channels=DIM, num_classes=2,
                        **{k: v for k, v in model.items() if k != "name"})
    assert built.router.top_k == 2 and built.context is not None
