import copy
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from torch_geometric.data import Batch

from conftest import nested_levels
from wsigraph.data.graph import build_slide_graph
from wsigraph.data.schema import adjacency_edge, node_batch, num_slides, patch_levels
from wsigraph.models import MODEL_REGISTRY, MILOutput, build_model
from wsigraph.models.clam import smooth_top1_svm_loss
from wsigraph.models.transmil import CoordinatePPEG, lattice_cells
from wsigraph.transforms import graph_transform

DIM = 16
NUM_CLASSES = 3
TOP = "patch_20x"

# (columns, rows, lattice origin, 20x patches removed): different sizes, offset origins, holes,
# and a two-patch slide, smaller than CLAM's k_sample and with a single 10x/5x patch.
SLIDES = [(9, 7, (37, 11), [0, 5, 30]), (5, 4, (0, 0), [7]), (2, 1, (300, 200), []),
          (12, 8, (1000, 90), [3, 4, 20, 21, 22, 60])]


def make_slide(cols, rows, origin, drop, seed, label):
    levels = nested_levels(cols, rows, origin, drop, seed, DIM)
    graph = build_slide_graph(levels, f"s{seed}", f"c{seed}", label=label)
    return graph_transform({"regions": {"strategy": "grid", "grid_size": 3}, "region_knn": 3})(graph)


@pytest.fixture(scope="module")
def slides():
    return [make_slide(*spec, seed=i, label=i % NUM_CLASSES) for i, spec in enumerate(SLIDES)]


def batch_of(graphs):
    return Batch.from_data_list([copy.copy(g) for g in graphs])


def assert_one_value_per_node(output, data):
    assert isinstance(output, MILOutput)
    assert output.interpretation, "a model must explain itself on at least one node type"
    for node_type, values in output.interpretation.items():
        for name, value in values.items():
            assert value.shape[0] == data[node_type].num_nodes, (node_type, name, tuple(value.shape))


@pytest.mark.parametrize("name", sorted(MODEL_REGISTRY))
def test_registered_model(name, slides):
    torch.manual_seed(0)
    model = build_model(name, in_channels=DIM, num_classes=NUM_CLASSES)
    assert type(model).__name__ in repr(model) and "\n" not in repr(model)  # short, one-line repr
    batch = batch_of(slides)

    # Evaluation: a batch gives each slide's own result (logits and interpretation).
    model.eval()
    with torch.no_grad():
        output = model(batch)
        assert output.logits.shape == (len(slides), NUM_CLASSES)
        assert float(output.aux_loss) == 0.0
        assert_one_value_per_node(output, batch)
        for i, graph in enumerate(slides):
            alone = model(graph)
            torch.testing.assert_close(output.logits[i:i + 1], alone.logits, atol=1e-5, rtol=1e-4)
            for node_type, values in alone.interpretation.items():
                mask = batch[node_type].batch == i
                for key, value in values.items():
                    torch.testing.assert_close(output.interpretation[node_type][key][mask].to(value.dtype),
                                               value, atol=1e-5, rtol=1e-4)

    # Training: the loss (with any auxiliary term) reaches the parameters and the inputs.
    model.train()
    batch = batch_of(slides)
    for level in patch_levels(batch):
        batch[level].x.requires_grad_(True)
    output = model(batch)
    assert_one_value_per_node(output, batch)
    loss = model.loss(output, batch.y)
    assert loss.dim() == 0 and torch.isfinite(loss)
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)
    input_grads = [batch[level].x.grad for level in patch_levels(batch) if batch[level].x.grad is not None]
    assert input_grads and all(torch.isfinite(g).all() for g in input_grads)
    assert any(g.abs().sum() > 0 for g in input_grads)


def per_slide(batch, level=TOP):
    index = node_batch(batch, level)
    return [batch[level].x[index == i] for i in range(num_slides(batch))]


def test_abmil_matches_dense_reference(slides):
    torch.manual_seed(1)
    model = build_model("abmil", in_channels=DIM, num_classes=NUM_CLASSES).eval()
    batch = batch_of(slides)
    with torch.no_grad():
        output = model(batch)
        for i, x in enumerate(per_slide(batch)):
            h = torch.relu(x @ model.encoder[0].weight.T + model.encoder[0].bias)
            pool = model.pool
            gated = torch.tanh(h @ pool.lin_tanh.weight.T + pool.lin_tanh.bias) * \
                torch.sigmoid(h @ pool.lin_gate.weight.T + pool.lin_gate.bias)
            score = (gated @ pool.lin_score.weight.T + pool.lin_score.bias).squeeze(1)
            attention = torch.exp(score - score.max())
            attention = attention / attention.sum()
            logits = (attention[:, None] * h).sum(0) @ model.classifier.weight.T + model.classifier.bias
            torch.testing.assert_close(output.interpretation[TOP]["attention"][batch[TOP].batch == i], attention)
            torch.testing.assert_close(output.logits[i], logits, atol=1e-5, rtol=1e-5)


def test_abmil_uses_requested_level(slides):
    model = build_model("abmil", in_channels=DIM, num_classes=2, level="patch_5x").eval()
    batch = batch_of(slides)
    with torch.no_grad():
        output = model(batch)
    assert list(output.interpretation) == ["patch_5x"]
    assert output.interpretation["patch_5x"]["attention"].shape[0] == batch["patch_5x"].num_nodes
    with pytest.raises(KeyError, match="patch_40x"):
        build_model("abmil", in_channels=DIM, num_classes=2, level="patch_40x")(batch)


def test_mean_and_max_pooling(slides):
    torch.manual_seed(2)
    batch = batch_of(slides)
    max_model = build_model("max_mil", in_channels=DIM, num_classes=NUM_CLASSES).eval()
    mean_model = build_model("mean_mil", in_channels=DIM, num_classes=NUM_CLASSES).eval()
    with torch.no_grad():
        max_out, mean_out = max_model(batch), mean_model(batch)
        for i, x in enumerate(per_slide(batch)):
            instance = max_model.instance_classifier(x)
            torch.testing.assert_close(max_out.logits[i], instance.max(dim=0).values)
            predicted = max_out.logits[i].argmax()
            torch.testing.assert_close(max_out.interpretation[TOP]["score"][batch[TOP].batch == i],
                                       instance[:, predicted])
            expected = mean_model.classifier(mean_model.encoder(x).mean(dim=0))
            torch.testing.assert_close(mean_out.logits[i], expected, atol=1e-6, rtol=1e-5)
            weights = mean_out.interpretation[TOP]["score"][batch[TOP].batch == i]
            torch.testing.assert_close(weights, torch.full((x.size(0),), 1.0 / x.size(0)))


def test_smooth_svm_loss_closed_forms():
    logits, target = torch.randn(20, 2), torch.randint(0, 2, (20,))
    # alpha = 0, tau = 1 is the cross-entropy; tau -> 0 is the multi-class hinge.
    torch.testing.assert_close(smooth_top1_svm_loss(logits, target, alpha=0.0),
                               F.cross_entropy(logits, target, reduction="none"))
    margin = 1.0 - F.one_hot(target, 2).float()
    hinge = (logits + margin).max(dim=1).values - logits.gather(1, target[:, None]).squeeze(1)
    torch.testing.assert_close(smooth_top1_svm_loss(logits, target, tau=1e-3), hinge, atol=1e-2, rtol=0)


def clam_reference_loss(model, batch):
    r"""CLAM's instance loss, one slide at a time with torch.topk, k clipped as documented."""
    losses = []
    classes = model.num_classes
    for i, x in enumerate(per_slide(batch)):
        h = model.encoder(x)
        scores = model.pool.score(h)  # [N, branches]
        label = int(batch.y[i])
        total = 0.0
        for c in range(classes):
            score = scores[:, c if scores.size(1) > 1 else 0]
            weight = model.instance_classifiers.weight[2 * c:2 * c + 2]
            bias = model.instance_classifiers.bias[2 * c:2 * c + 2]
            if c == label:
                k = min(model.k_sample, x.size(0) // 2)
                if k == 0:
                    continue
                top = torch.topk(score, k).indices
                bottom = torch.topk(-score, k).indices
                chosen = torch.cat([top, bottom])
                target = torch.cat([torch.ones(k), torch.zeros(k)]).long()
            elif model.subtyping:
                k = min(model.k_sample, x.size(0))
                chosen = torch.topk(score, k).indices
                target = torch.zeros(k).long()
            else:
                continue
            logits = h[chosen] @ weight.T + bias
            if model.instance_loss_type == "svm":
                total = total + smooth_top1_svm_loss(logits, target).mean()
            else:
                total = total + F.cross_entropy(logits, target)
        losses.append(total / classes if model.subtyping else total)
    return torch.stack([torch.as_tensor(v, dtype=torch.float32) for v in losses]).mean()


@pytest.mark.parametrize("name,options", [("clam_sb", {}), ("clam_mb", {"subtyping": True}),
                                          ("clam_sb", {"subtyping": True, "instance_loss": "ce"}),
                                          ("clam_mb", {"k_sample": 3})])
def test_clam_instance_loss(name, options, slides):
    torch.manual_seed(3)
    model = build_model(name, in_channels=DIM, num_classes=NUM_CLASSES, dropout=0.0, **options)
    batch = batch_of(slides)
    model.train()  # dropout 0: training-mode forward is deterministic
    output = model(batch)
    loss = output.extras["instance_loss"]
    assert torch.isfinite(loss) and loss > 0
    with torch.no_grad():
        torch.testing.assert_close(loss, clam_reference_loss(model, batch), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(output.aux_loss, model.instance_loss_weight * loss)
    # The two-patch slide alone (smaller than k_sample) gives a finite loss; a single patch
    # gets no in-class pseudo-label (only out-of-class ones when subtyping).
    tiny = slides[2]
    assert tiny[TOP].num_nodes < model.k_sample
    assert torch.isfinite(model(tiny).aux_loss)
    single = copy.copy(tiny)
    single[TOP].x = tiny[TOP].x[:1]
    single[TOP].pos = tiny[TOP].pos[:1]
    single_loss = model(single).aux_loss.detach()
    assert torch.isfinite(single_loss)
    if not model.subtyping:
        assert float(single_loss) == 0.0
    with torch.no_grad():
        torch.testing.assert_close(single_loss, model.instance_loss_weight * clam_reference_loss(model, single))
    model.eval()
    assert float(model(batch).aux_loss) == 0.0


def test_dsmil_matches_dense_reference(slides):
    torch.manual_seed(4)
    model = build_model("dsmil", in_channels=DIM, num_classes=NUM_CLASSES).eval()
    batch = batch_of(slides)
    with torch.no_grad():
        output = model(batch)
        for i, x in enumerate(per_slide(batch)):
            instance = model.instance_classifier(x)
            critical = instance.argmax(dim=0)  # [C]
            query = model.query(x)
            attention = torch.softmax(query @ query[critical].T / math.sqrt(query.size(1)), dim=0)  # [N, C]
            bag = attention.T @ x  # [C, D]
            logits = model.bag_classifier(bag.reshape(-1))
            torch.testing.assert_close(output.logits[i], logits, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(output.interpretation[TOP]["attention_per_class"][batch[TOP].batch == i],
                                       attention)
            torch.testing.assert_close(output.extras["max_logits"][i], instance.max(dim=0).values)
    model.train()
    output = model(batch)
    torch.testing.assert_close(output.aux_loss, F.cross_entropy(output.extras["max_logits"], batch.y))


def permuted(graph, level, perm):
    out = copy.copy(graph)
    out[level].x = graph[level].x[perm]
    out[level].pos = graph[level].pos[perm]
    return out


def test_coordinate_ppeg_places_tokens_on_lattice():
    torch.manual_seed(5)
    ppeg = CoordinatePPEG(4)
    # Two slides; lattice corners offset by a fraction of a patch round to the same cells.
    pos = torch.tensor([[10., 20.], [266., 20.], [10., 276.], [780., 540.],
                        [0., 0.], [512., 512.], [1536., 0.]])
    pos[3] += 30  # CLAM-style sub-patch offset
    size = torch.tensor([256.] * 4 + [512.] * 3)
    index = torch.tensor([0, 0, 0, 0, 1, 1, 1])
    cells = lattice_cells(pos, size, index, 2)
    assert cells.tolist() == [[0, 0], [1, 0], [0, 1], [3, 2], [0, 0], [1, 1], [3, 0]]
    x = torch.randn(7, 4)
    out = ppeg(x, cells, index, 2)
    for b in range(2):
        mask = index == b
        rows, cols = int(cells[mask, 1].max()) + 1, int(cells[mask, 0].max()) + 1
        grid = torch.zeros(1, 4, rows, cols)
        for (c, r), value in zip(cells[mask].tolist(), x[mask]):
            grid[0, :, r, c] = value
        conv = sum(F.conv2d(grid, m.weight, m.bias, padding=m.padding, groups=4) for m in ppeg.convs)
        expected = x[mask] + torch.stack([conv[0, :, r, c] for c, r in cells[mask].tolist()])
        torch.testing.assert_close(out[mask], expected)


def test_transmil_uses_coordinates_not_order(slides):
    torch.manual_seed(6)
    model = build_model("transmil", in_channels=DIM, num_classes=NUM_CLASSES).eval()
    graph = slides[0]
    n = graph[TOP].num_nodes
    perm = torch.randperm(n)
    with torch.no_grad():
        reference = model(graph)
        shuffled = model(permuted(graph, TOP, perm))
        torch.testing.assert_close(shuffled.logits, reference.logits, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(shuffled.interpretation[TOP]["attention"],
                                   reference.interpretation[TOP]["attention"][perm], atol=1e-6, rtol=1e-4)
        # Moving patches elsewhere on the lattice changes the prediction.
        moved = copy.copy(graph)
        moved[TOP].pos = graph[TOP].pos[torch.randperm(n)]
        assert not torch.allclose(model(moved).logits, reference.logits, atol=1e-4)


def test_patch_gnn_uses_adjacency(slides):
    torch.manual_seed(7)
    graph = slides[3]
    edge_type = adjacency_edge(TOP)
    for conv in ("sage", "gcn"):
        model = build_model("patch_gnn", in_channels=DIM, num_classes=NUM_CLASSES, conv=conv).eval()
        with torch.no_grad():
            reference = model(graph).logits
            rewired = copy.copy(graph)
            edge_index = graph[edge_type].edge_index
            rewired[edge_type].edge_index = torch.stack([edge_index[0], edge_index[1][torch.randperm(edge_index.size(1))]])
            assert not torch.allclose(model(rewired).logits, reference, atol=1e-4)
            # Relabelling the nodes together with their edges changes nothing.
            perm = torch.randperm(graph[TOP].num_nodes)
            inverse = torch.empty_like(perm)
            inverse[perm] = torch.arange(perm.numel())
            relabelled = permuted(graph, TOP, perm)
            relabelled[edge_type].edge_index = inverse[edge_index]
            torch.testing.assert_close(model(relabelled).logits, reference, atol=1e-5, rtol=1e-5)
    without = copy.copy(graph)
    del without[edge_type]
    with pytest.raises(KeyError, match="PatchGrid"):
        model(without)


CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs"


@pytest.mark.parametrize("path", sorted(CONFIG_DIR.glob("*.yaml")), ids=lambda p: p.name)
def test_config_model_section_builds(path):
    model = (yaml.safe_load(path.read_text()) or {}).get("model")
    if not isinstance(model, dict) or "name" not in model:
        pytest.skip("no model section")
    options = {key: value for key, value in model.items() if key != "name"}
    assert "in_channels" not in options and "num_classes" not in options  # filled from the data
    build_model(model["name"], in_channels=DIM, num_classes=2, **options)
