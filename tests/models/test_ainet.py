import copy
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch_geometric.data import Batch

from conftest import nested_levels
from wsigraph.config import load_config
from wsigraph.data.graph import build_slide_graph
from wsigraph.data.schema import REGION, adjacency_edge, node_batch, region_of_patch
from wsigraph.models import build_model
from wsigraph.models.ainet import predictor_graph
from wsigraph.transforms import graph_transform

DIM = 12
NUM_CLASSES = 3
TOP = "patch_20x"
REGION_SIZE = 6
SLIDES = [(7, 5, (37, 11), [0, 5]), (4, 4, (0, 0), [7]), (3, 1, (300, 200), []), (9, 4, (1000, 90), [3, 20])]


def make_slide(cols, rows, origin, drop, seed, label):
    levels = nested_levels(cols, rows, origin, drop, seed, DIM, scales=((10, 512), (20, 256)))
    graph = build_slide_graph(levels, f"s{seed}", f"c{seed}", label=label)
    config = {"regions": {"strategy": "fixed_size", "region_size": REGION_SIZE}, "region_knn": 2}
    return graph_transform(config)(graph)


@pytest.fixture(scope="module")
def slides():
    return [make_slide(*spec, seed=i, label=i % NUM_CLASSES) for i, spec in enumerate(SLIDES)]


def batch_of(graphs):
    return Batch.from_data_list([copy.copy(g) for g in graphs])


def model_of(**options):
    torch.manual_seed(0)
    options.setdefault("dropout", 0.0)
    return build_model("ainet", in_channels=DIM, num_classes=NUM_CLASSES, hidden_channels=16,
                       attention_channels=8, **options)


def corrected_features(model, batch):
    r"""The ARC output of a forward pass, caught with a hook."""
    caught = {}
    handle = model.correction.register_forward_hook(lambda module, args, out: caught.setdefault("h", out))
    try:
        output = model(batch)
    finally:
        handle.remove()
    return output, caught["h"]


def test_predictor_matches_dense_reference(slides):
    model = model_of(mask_ratio=0.5).eval()
    batch = batch_of(slides)
    region = region_of_patch(batch, TOP)
    with torch.no_grad():
        output, corrected = corrected_features(model, batch)
        score = model.pool.score(corrected).squeeze(-1)
        kept = output.interpretation[TOP]["kept"].bool()
        for r in range(batch[REGION].num_nodes):
            members = (region == r).nonzero().view(-1)
            n = members.numel()
            assert int(kept[members].sum()) == max(1, n - math.floor(0.5 * n))
            top = torch.topk(score[members], int(kept[members].sum())).indices
            assert sorted(members[top].tolist()) == members[kept[members]].tolist()
            attention = torch.softmax(score[members][kept[members]], 0)
            embedding = attention @ corrected[members][kept[members]]
            torch.testing.assert_close(output.extras["region_logits"][r], model.classifier(embedding),
                                       atol=1e-5, rtol=1e-5)
        for b in range(len(slides)):
            members = ((node_batch(batch, TOP) == b) & kept).nonzero().view(-1)
            attention = torch.softmax(score[members], 0)
            torch.testing.assert_close(output.interpretation[TOP]["attention"][members], attention)
            torch.testing.assert_close(output.logits[b], model.classifier(attention @ corrected[members]),
                                       atol=1e-5, rtol=1e-5)
        assert output.interpretation[TOP]["attention"][~kept].abs().sum() == 0
        # One anchor per region, chosen by the dual-level score.
        anchor = output.interpretation[TOP]["anchor"].bool()
        assert torch.equal(torch.bincount(region[anchor], minlength=batch[REGION].num_nodes),
                           torch.ones(batch[REGION].num_nodes, dtype=torch.long))


def test_mask_ratio_zero_keeps_everything(slides):
    model = model_of(mask_ratio=0.0).eval()
    with torch.no_grad():
        output = model(batch_of(slides))
    assert output.interpretation[TOP]["kept"].all()


def test_loss_terms_weighted_as_configured(slides):
    batch = batch_of(slides)
    values = {}
    for weights in ((0.5, 1.0), (2.0, 0.0), (0.0, 3.0)):
        model = model_of(region_loss_weight=weights[0], consistency_weight=weights[1]).train()
        output = model(batch)
        region_loss, consistency = output.extras["region_loss"], output.extras["consistency_loss"]
        assert torch.isfinite(region_loss) and torch.isfinite(consistency) and region_loss > 0 and consistency > 0
        torch.testing.assert_close(output.aux_loss, weights[0] * region_loss + weights[1] * consistency)
        values[weights] = (region_loss.detach(), consistency.detach())
        total = model.loss(output, batch.y)
        torch.testing.assert_close(total, F.cross_entropy(output.logits, batch.y) + output.aux_loss)
    # The terms do not depend on their weights.
    first = values[(0.5, 1.0)]
    for other in values.values():
        torch.testing.assert_close(other[0], first[0])
        torch.testing.assert_close(other[1], first[1])
    # Dense references: per-slide means of the region cross-entropies and of the reconstruction error.
    model = model_of().train()
    output = model(batch)
    region = region_of_patch(batch, TOP)
    region_batch = node_batch(batch, REGION)
    index = node_batch(batch, TOP)
    with torch.no_grad():
        h = model.projection(batch[TOP].x)
        per_slide_region, per_slide_mse = [], []
        for b in range(len(slides)):
            regions = [r for r in (region_batch == b).nonzero().view(-1).tolist() if (region == r).any()]
            logits = output.extras["region_logits"][regions]
            per_slide_region.append(F.cross_entropy(logits, batch.y[b].repeat(len(regions))))
            members = index == b
            per_slide_mse.append(F.mse_loss(model.decoder(h[members]), batch[TOP].x[members]))
        torch.testing.assert_close(output.extras["region_loss"], torch.stack(per_slide_region).mean())
        torch.testing.assert_close(output.extras["consistency_loss"], torch.stack(per_slide_mse).mean())
    model.eval()
    assert float(model(batch).aux_loss) == 0.0


def test_training_batched_equals_per_slide(slides):
    model = model_of().train()
    output = model(batch_of(slides))
    alone = [model(graph) for graph in slides]
    torch.testing.assert_close(output.logits, torch.cat([o.logits for o in alone]), atol=1e-5, rtol=1e-4)
    for key in ("region_loss", "consistency_loss"):
        torch.testing.assert_close(output.extras[key], torch.stack([o.extras[key] for o in alone]).mean())
    torch.testing.assert_close(output.aux_loss, torch.stack([o.aux_loss for o in alone]).mean())


def test_correction_is_region_local_unless_anchor(slides):
    model = model_of().eval()
    graph = slides[0]  # 33 patches: regions of 6 along the raster order
    region = region_of_patch(graph, TOP)
    with torch.no_grad():
        reference, corrected = corrected_features(model, graph)
        anchor = reference.interpretation[TOP]["anchor"].bool()
        target, far = 0, 3  # region 0's adjacent region is 1
        in_target = region == target
        candidates = ((region == far) & ~anchor).nonzero().view(-1)
        for i in candidates.tolist():
            changed = copy.copy(graph)
            changed[TOP].x = graph[TOP].x.clone()
            changed[TOP].x[i] += 0.01 * torch.randn(DIM)
            output, new = corrected_features(model, changed)
            if torch.equal(output.interpretation[TOP]["anchor"].bool(), anchor):
                break  # the bag mean moved, but not enough to change an anchor
        else:
            pytest.fail("every perturbation changed an anchor")
        torch.testing.assert_close(new[in_target], corrected[in_target])
        assert not torch.allclose(new[region == far], corrected[region == far])
        # Changing the far region's anchor reaches region 0 through the anchors.
        changed = copy.copy(graph)
        changed[TOP].x = graph[TOP].x.clone()
        changed[TOP].x[anchor & (region == far)] += 0.01 * torch.randn(DIM)
        output, new = corrected_features(model, changed)
        assert not torch.allclose(new[in_target], corrected[in_target])


@pytest.mark.parametrize("options", [
    {"anchor_mode": "random"}, {"anchor_mode": "attention"}, {"anchor_mode": "max"}, {"anchor_mode": "none"},
    {"alpha": 1.0}, {"alpha": 0.0}, {"adjacent": "none"}, {"adjacent": "knn"}, {"correction": False},
    {"anchor_scope": "slide", "num_anchors": 4}, {"heads": 2},
])
def test_ablation_switches_run_batched(options, slides):
    model = model_of(**options).eval()
    batch = batch_of(slides)
    with torch.no_grad():
        output = model(batch)
        for i, graph in enumerate(slides):
            torch.testing.assert_close(output.logits[i:i + 1], model(graph).logits, atol=1e-5, rtol=1e-4)
    anchor = output.interpretation[TOP]["anchor"]
    if options.get("anchor_scope") == "slide":
        counts = torch.bincount(node_batch(batch, TOP)[anchor.bool()], minlength=len(slides))
        sizes = torch.bincount(node_batch(batch, TOP), minlength=len(slides))
        assert counts.tolist() == sizes.clamp(max=4).tolist()
    if "alpha" in options:
        h = model.projection(batch[TOP].x).detach()
        region = region_of_patch(batch, TOP)
        index = node_batch(batch, TOP)
        local = torch.stack([h[region == r].mean(0) for r in range(batch[REGION].num_nodes)])[region]
        bag = torch.stack([h[index == b].mean(0) for b in range(len(slides))])[index]
        expected = F.cosine_similarity(h, local if options["alpha"] == 1.0 else bag, dim=-1)
        torch.testing.assert_close(output.interpretation[TOP]["anchor_score"], expected)
    model.train()
    model(batch_of(slides)).logits.sum().backward()


@pytest.mark.parametrize("predictor,args", [("transmil", {"hidden_channels": 16, "heads": 2}),
                                            ("patch_gnn", {"hidden_channels": 8}), ("abmil", {})])
def test_plug_in_predictor(predictor, args, slides):
    model = model_of(predictor=predictor, predictor_args=args)
    assert predictor in repr(model)
    batch = batch_of(slides)
    model.eval()
    with torch.no_grad():
        output = model(batch)
        kept = output.interpretation[TOP]["kept"].bool()
        assert output.interpretation[TOP]["attention"].shape == (batch[TOP].num_nodes,)
        assert output.interpretation[TOP]["attention"][~kept].abs().sum() == 0
        for i, graph in enumerate(slides):
            alone = model(graph)
            torch.testing.assert_close(output.logits[i:i + 1], alone.logits, atol=1e-5, rtol=1e-4)
    model.train()
    output = model(batch)
    loss = model.loss(output, batch.y)
    loss.backward()
    assert torch.isfinite(loss)
    assert model.correction.qkv.weight.grad.abs().sum() > 0  # the predictor's loss reaches ARC


def test_predictor_graph_keeps_only_kept_patches(slides):
    batch = batch_of(slides)
    num = batch[TOP].num_nodes
    keep = torch.rand(num, generator=torch.Generator().manual_seed(3)) < 0.6
    x = torch.randn(num, 5)
    index = node_batch(batch, TOP)
    region = region_of_patch(batch, TOP)
    graph = predictor_graph(batch, TOP, x, keep, index, len(slides), region)
    assert torch.equal(graph[TOP].x, x[keep])
    assert torch.equal(graph[TOP].pos, batch[TOP].pos[keep])
    assert graph[TOP].ptr.tolist() == [0] + torch.bincount(index[keep], minlength=len(slides)).cumsum(0).tolist()
    old = batch[adjacency_edge(TOP)].edge_index
    kept_ids = keep.nonzero().view(-1)
    expected = {(int(a), int(b)) for a, b in old.T.tolist() if keep[a] and keep[b]}
    new = graph[adjacency_edge(TOP)].edge_index
    assert {(int(kept_ids[a]), int(kept_ids[b])) for a, b in new.T.tolist()} == expected
    assert torch.equal(region_of_patch(graph, TOP), region[keep])
    assert graph.num_graphs == len(slides)


def test_runs_without_regions(slides):
    graph = copy.copy(slides[1])
    for edge_type in list(graph.edge_types):
        if REGION in (edge_type[0], edge_type[2]):
            del graph[edge_type]
    del graph[REGION]
    with torch.no_grad():
        output = model_of().eval()(graph)
    assert int(output.interpretation[TOP]["anchor"].sum()) == 1  # the slide is one region


def test_config_defaults():
    config = load_config(Path(__file__).resolve().parents[2] / "configs" / "ainet.yaml")
    regions = config["graph"]["regions"]
    assert regions["strategy"] == "fixed_size" and regions["region_size"] == 256
    options = {k: v for k, v in config["model"].items() if k != "name"}
    model = build_model(config["model"]["name"], in_channels=DIM, num_classes=2, **options)
    assert model.mask_ratio == 0.5 and model.mining.alpha == 0.7
    assert model.region_loss_weight == 0.5 and model.consistency_weight == 1.0
    with pytest.raises(ValueError):
        build_model("ainet", in_channels=DIM, num_classes=2, predictor="ainet")


def test_reconstruction_error_matches_direct_form():
    from wsigraph.models.ainet import reconstruction_error
    generator = torch.Generator().manual_seed(9)
    h = torch.randn(300, 16, generator=generator, requires_grad=True)
    weight = (0.3 * torch.randn(40, 16, generator=generator)).requires_grad_()
    bias = torch.randn(40, generator=generator, requires_grad=True)
    x = torch.randn(300, 40, generator=generator)
    lean = reconstruction_error(h, x, weight, bias)
    direct = (h @ weight.T + bias - x).pow(2).mean(-1)
    torch.testing.assert_close(lean, direct, atol=1e-5, rtol=1e-5)
    for a, b in zip(torch.autograd.grad(lean.sum(), (h, weight, bias)),
                    torch.autograd.grad(direct.sum(), (h, weight, bias))):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
