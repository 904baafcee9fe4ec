import copy

import pytest
import torch
from torch_geometric.data import Batch

from conftest import nested_levels
from wsigraph.data.graph import build_slide_graph
from wsigraph.data.schema import node_batch, patch_levels, region_of_patch, zoom_edge
from wsigraph.models import build_model
from wsigraph.models.m2otca import M2OTCA
from wsigraph.transforms import graph_transform

DIM = 6
NUM_CLASSES = 3
NUM_REGIONS = 5
SMALL = dict(prototype_channels=12, attention_channels=8, head_attention_channels=6)
MAGNIFICATIONS = ((5, 1024), (10, 512), (20, 256))


def make_slide(cols, rows, origin, keep, seed, label, magnifications=MAGNIFICATIONS, num_regions=NUM_REGIONS):
    levels = nested_levels(cols, rows, origin, (), seed, DIM, scales=magnifications, keep=keep)
    graph = build_slide_graph(levels, f"s{seed}", f"c{seed}", label=label)
    transform = graph_transform({"regions": {"strategy": "sequential", "num_regions": num_regions},
                                 "region_knn": 2, "patch_grid": False})
    return transform(graph)


# Irregular tissue on offset lattices; the third slide has fewer patches (2) than prototypes.
SPECS = [(10, 9, (37, 11), 0.75), (6, 5, (0, 300), 0.9), (2, 1, (300, 200), 1.0), (9, 12, (1000, 90), 0.7)]


@pytest.fixture(scope="module")
def slides():
    return [make_slide(*spec, seed=i, label=i % NUM_CLASSES) for i, spec in enumerate(SPECS)]


def batch_of(graphs):
    return Batch.from_data_list([copy.copy(g) for g in graphs])


def model_of(**options):
    torch.manual_seed(0)
    return build_model("m2otca", in_channels=DIM, num_classes=NUM_CLASSES, **{**SMALL, **options})


def test_prototype_j_covers_the_same_tissue_at_every_level(slides):
    batch = batch_of(slides)
    aligned = model_of().prototype_slots(batch)
    independent = model_of(alignment="independent", num_prototypes=NUM_REGIONS).prototype_slots(batch)
    levels = patch_levels(batch)
    top = levels[-1]
    # The slot of a patch is its graph region, at every level.
    for level in levels:
        assert torch.equal(aligned.slot[level], aligned.region_slot[region_of_patch(batch, level)])
    # Top level: both constructions are the raster-ordered chunks of the highest magnification.
    assert torch.equal(aligned.slot[top] % aligned.size, independent.slot[top] % independent.size)
    # Lower levels: with aligned regions a parent feeds the prototype that holds most of its
    # children (the region propagation rule), so prototype j is the same tissue at every level;
    # chunking each level on its own breaks this.
    agreement, majority_holds = {}, {}
    for name, slots in (("aligned", aligned), ("independent", independent)):
        matches, total, holds = 0, 0, True
        for parent_level, child_level in zip(levels[:-1], levels[1:]):
            parent, child = batch[zoom_edge(parent_level, child_level)].edge_index
            parent_slot = slots.slot[parent_level][parent] % slots.size
            child_slot = slots.slot[child_level][child] % slots.size
            matches += int((parent_slot == child_slot).sum())
            total += parent.numel()
            votes = torch.zeros(batch[parent_level].num_nodes, slots.size, dtype=torch.long)
            votes.index_put_((parent, child_slot), torch.ones_like(parent), accumulate=True)
            has_children = votes.sum(1) > 0
            best = votes.max(1).values
            own = slots.slot[parent_level] % slots.size
            own_votes = votes.gather(1, own[:, None]).squeeze(1)
            holds = holds and bool((own_votes[has_children] == best[has_children]).all())
        agreement[name], majority_holds[name] = matches / total, holds
    assert majority_holds["aligned"] and not majority_holds["independent"]
    assert agreement["aligned"] > agreement["independent"]


def test_gradcam_weights_equal_direct_autograd(slides):
    model = model_of().eval()
    batch = batch_of(slides)
    with torch.no_grad():
        output = model(batch)
    slots = model.prototype_slots(batch)
    top = patch_levels(batch)[-1]
    flat, _ = model.encoders[-1](batch[top].x, slots.slot[top], len(slides) * slots.size)
    prototypes = flat.view(len(slides), slots.size, -1)
    for b in range(len(slides)):
        mask = slots.mask[top][b:b + 1]
        p = prototypes[b:b + 1].detach().clone().requires_grad_(True)
        logits = model.heads[-1](p, mask).logits
        c = int(logits.argmax())
        grad, = torch.autograd.grad(logits[0, c], p)
        w = grad[0].mean(-1).clamp_min(0) * mask[0]
        expected = w / w.max() if w.max() > 0 else mask[0].float()
        torch.testing.assert_close(output.extras["gradcam_weights"][b], expected)
        assert int(output.extras["gradcam_target"][b]) == c
        torch.testing.assert_close(output.extras[f"logits_{top}"][b], logits[0].detach())


def test_evaluation_without_gradients_and_forward_leaves_no_grad(slides):
    model = model_of()
    batch = batch_of(slides)
    model.eval()
    with torch.no_grad():
        evaluated = model(batch)
    assert not evaluated.logits.requires_grad and torch.isfinite(evaluated.logits).all()
    with torch.inference_mode():
        inferred = model(batch)
    torch.testing.assert_close(inferred.logits, evaluated.logits)
    # A training forward computes Grad-CAM with autograd but writes no parameter's .grad.
    model.train()
    output = model(batch)
    assert output.logits.requires_grad
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("cross_attention,embedding", [("full", None), ("ot", None), ("gradcam", None),
                                                       ("none", None), ("full", 7)])
def test_every_level_encoder_learns(slides, cross_attention, embedding):
    model = model_of(cross_attention=cross_attention, embedding_channels=embedding).train()
    batch = batch_of(slides)
    output = model(batch)
    model.loss(output, batch.y).backward()
    for position, (encoder, head) in enumerate(zip(model.encoders, model.heads)):
        for module in (encoder, head):
            for name, parameter in module.named_parameters():
                assert parameter.grad is not None and torch.isfinite(parameter.grad).all(), (position, name)
                assert parameter.grad.abs().sum() > 0, (position, name)


def test_gradcam_target_rule(slides):
    batch = batch_of(slides)
    model = model_of()
    model.eval()
    with torch.no_grad():
        evaluated = model(batch)
    predicted = evaluated.extras["gradcam_target"]
    batch.y = (predicted + 1) % NUM_CLASSES  # labels that all differ from the prediction
    model.train()  # dropout 0: the training forward computes the same numbers
    with torch.no_grad():
        trained = model(batch)
    assert torch.equal(trained.extras["gradcam_target"], predicted)
    torch.testing.assert_close(trained.extras["gradcam_weights"], evaluated.extras["gradcam_weights"])
    torch.testing.assert_close(trained.logits, evaluated.logits)

    labelled = model_of(gradcam_target="label")
    labelled.train()
    assert torch.equal(labelled(batch).extras["gradcam_target"], batch.y)
    labelled.eval()
    with torch.no_grad():
        assert torch.equal(labelled(batch).extras["gradcam_target"], predicted)


@pytest.mark.parametrize("options", [dict(alignment="independent", num_prototypes=4),
                                     dict(alignment="independent", num_prototypes=30, cross_attention="ot"),
                                     dict(cross_attention="gradcam"), dict(cross_attention="none"),
                                     dict(embedding_channels=7)])
def test_batched_equals_per_slide(slides, options):
    model = model_of(**options).eval()
    batch = batch_of(slides)
    with torch.no_grad():
        output = model(batch)
        assert torch.isfinite(output.logits).all()
        for i, graph in enumerate(slides):
            alone = model(graph)
            torch.testing.assert_close(output.logits[i:i + 1], alone.logits, atol=1e-5, rtol=1e-4)
            for node_type, values in alone.interpretation.items():
                mask = node_batch(batch, node_type) == i
                for key, value in values.items():
                    torch.testing.assert_close(output.interpretation[node_type][key][mask], value,
                                               atol=1e-5, rtol=1e-4)


def test_slides_smaller_than_the_prototype_set():
    # 2 patches at 20x (1 at 10x and 5x) with m = 30: one prototype per patch, padded OT.
    tiny = make_slide(2, 1, (300, 200), 1.0, seed=7, label=1, num_regions=30)
    for alignment in ("regions", "independent"):
        model = model_of(alignment=alignment).train()
        output = model(tiny)
        assert torch.isfinite(output.logits).all()
        model.loss(output, tiny.y).backward()
        assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
        plan = output.extras["plan_patch_5x"]
        assert torch.isfinite(plan).all()
        torch.testing.assert_close(plan.sum(), torch.tensor(1.0))


def test_uniform_grad_cam_fallback_in_the_model(slides):
    batch = batch_of(slides)
    full, ot_only = model_of().eval(), model_of(cross_attention="ot").eval()
    with torch.no_grad():  # a reference head with constant logits: every Grad-CAM weight is zero
        full.heads[-1].lin.weight.zero_()
    ot_only.load_state_dict(full.state_dict())  # all ablations share one parameter set
    with torch.no_grad():
        out_full, out_ot = full(batch), ot_only(batch)
    assert out_full.extras["gradcam_uniform"].all()
    weights = out_full.extras["gradcam_weights"]
    assert torch.equal(weights, out_full.extras["prototype_mask_patch_20x"].float())
    # Uniform weights leave the transported prototypes unchanged: Grad-CAM then equals OT only.
    for level in patch_levels(batch):
        torch.testing.assert_close(out_full.extras[f"logits_{level}"], out_ot.extras[f"logits_{level}"])


def test_ablations_route_information_as_documented(slides):
    batch = batch_of(slides)
    changed = copy.copy(batch)
    changed["patch_20x"].x = batch["patch_20x"].x + torch.randn_like(batch["patch_20x"].x)
    for cross_attention, lower_depends_on_reference in (("none", False), ("ot", True), ("gradcam", True),
                                                        ("full", True)):
        model = model_of(cross_attention=cross_attention).eval()
        with torch.no_grad():
            # The channel mean of the gradient of a linear head on attention-pooled prototypes is
            # about alpha_u * mean(W_c): one sign per slide. Positive classifier weights make the
            # Grad-CAM weights positive (not the uniform fallback), so they carry the 20x content.
            model.heads[-1].lin.weight.abs_()
            before, after = model(batch).extras, model(changed).extras
        for level in ("patch_5x", "patch_10x"):
            same = torch.allclose(before[f"logits_{level}"], after[f"logits_{level}"])
            assert same != lower_depends_on_reference, (cross_attention, level)
        assert ("plan_patch_10x" in before) == (cross_attention in ("full", "ot"))
        assert ("gradcam_weights" in before) == (cross_attention in ("full", "gradcam"))


def test_any_number_of_levels():
    four = ((2.5, 2048),) + MAGNIFICATIONS
    graphs = [make_slide(12, 10, (5, 9), 0.8, seed=s, label=s % 2, magnifications=four) for s in range(2)]
    batch = batch_of(graphs)
    assert patch_levels(batch) == ["patch_2p5x", "patch_5x", "patch_10x", "patch_20x"]
    for options, expected in ((dict(num_levels=4), ["patch_2p5x", "patch_5x", "patch_10x", "patch_20x"]),
                              (dict(num_levels=2), ["patch_10x", "patch_20x"]),
                              (dict(levels=["patch_20x", "patch_2p5x"]), ["patch_2p5x", "patch_20x"])):
        model = model_of(**options).eval()
        assert model.input_levels(batch) == expected
        with torch.no_grad():
            output = model(batch)
            for i, graph in enumerate(graphs):
                torch.testing.assert_close(output.logits[i:i + 1], model(graph).logits, atol=1e-5, rtol=1e-4)
        assert sorted(k for k in output.extras if k.startswith("plan_")) == sorted(f"plan_{l}" for l in expected[:-1])
    with pytest.raises(ValueError, match="at least two levels"):
        model_of(num_levels=1)
    with pytest.raises(ValueError, match="num_levels=5"):
        model_of(num_levels=5)(batch)


def test_interpretation_is_within_region_attention_times_relevance(slides):
    model = model_of().eval()
    batch = batch_of(slides)
    with torch.no_grad():
        output = model(batch)
    slots = model.prototype_slots(batch)
    weights = output.extras["gradcam_weights"].reshape(-1)
    for level in patch_levels(batch):
        values = output.interpretation[level]
        expected = values["within_region_attention"] * weights[slots.slot[level]]
        torch.testing.assert_close(values["attention"], expected)
        # Within-region attention sums to one over each region's patches at this level.
        sums = torch.zeros(batch["region"].num_nodes).index_add_(0, region_of_patch(batch, level),
                                                                 values["within_region_attention"])
        present = torch.bincount(region_of_patch(batch, level), minlength=batch["region"].num_nodes) > 0
        torch.testing.assert_close(sums[present], torch.ones(int(present.sum())))
    torch.testing.assert_close(output.interpretation["region"]["gradcam"], weights[slots.region_slot])
    assert isinstance(model, M2OTCA) and "m2otca" == model.registry_name


def test_config_builds_sequential_regions():
    from pathlib import Path

    from wsigraph.train import load_experiment_config
    config = load_experiment_config(Path(__file__).resolve().parents[2] / "configs" / "m2otca.yaml")
    # The base config's grid settings must not leak into the sequential partition.
    assert config["graph"]["regions"] == {"strategy": "sequential", "num_regions": 30}
    graph = make_slide(7, 6, (0, 0), 1.0, seed=3, label=0, num_regions=30)
    transform = graph_transform({**config["graph"], "patch_grid": False})
    assert "SequentialRegions(num_regions=30)" in repr(transform)
    model = build_model(config["model"]["name"], in_channels=DIM, num_classes=2,
                        **{k: v for k, v in config["model"].items() if k != "name"})
    assert model.alignment == "regions" and model.cross_attention == "full"
    assert torch.isfinite(model.eval()(graph).logits).all()
