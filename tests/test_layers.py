"""The architecture, checked from the imports: lower layers never import upper ones, and there is no cycle."""

import ast
import pathlib

import medu_jax

SRC = pathlib.Path(medu_jax.__file__).parent

# bottom to top: the core (codes, compressors, histories, stores), federated training, unlearning, experiments
LAYERS = [
    {"lattices", "packing", "trees", "objectives"},
    {"dither", "entropy"},
    {"compressors"},
    {"history"},
    {"thresholding"},  # block thresholding: a filter layer with its stored form (strip) over History
    {"store", "recording"},
    {"fedavg"},
    {"unlearn"},
    {"recovery"},
    {"baselines"},
    {"data", "attacks", "models", "metrics", "rum", "s3t", "zoga"},
    {"tables", "timing"},  # the experiments' shared table/plot writer and timer
    {"suite", "experiment", "zoga_experiment", "rum_experiment", "s3t_experiment"},  # one module per experiment
    {"cli"},
]
LAYER = {m: i for i, mods in enumerate(LAYERS) for m in mods}


def imports(module: str) -> set[str]:
    """Every medu_jax module ``module`` imports, at the top or inside functions."""
    tree = ast.parse((SRC / f"{module}.py").read_text())
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("medu_jax"):
            parts = node.module.split(".")
            if len(parts) > 1:
                out.add(parts[1])
            else:  # from medu_jax import a, b
                out.update(a.name for a in node.names)
        elif isinstance(node, ast.Import):
            out.update(a.name.split(".")[1] for a in node.names if a.name.startswith("medu_jax."))
    return out - {module}


def test_every_module_has_a_layer():
    modules = {p.stem for p in SRC.glob("*.py")} - {"__init__"}
    assert modules == set(LAYER), f"unplaced: {modules - set(LAYER)}, gone: {set(LAYER) - modules}"


def test_lower_layers_never_import_upper_ones():
    bad = [(m, d) for m in LAYER for d in imports(m) if LAYER[d] > LAYER[m]]
    assert not bad, f"imports going up the layers: {bad}"


def test_the_import_graph_has_no_cycle():
    graph = {m: imports(m) for m in LAYER}
    state: dict[str, int] = {}

    def visit(m, path):
        if state.get(m) == 1:
            raise AssertionError(f"import cycle: {' -> '.join(path + [m])}")
        if state.get(m) == 2:
            return
        state[m] = 1
        for d in sorted(graph[m]):
            visit(d, path + [m])
        state[m] = 2

    for m in sorted(graph):
        visit(m, [])


def test_experiments_never_import_each_other():
    experiments = LAYERS[LAYER["experiment"]]
    bad = [(m, d) for m in experiments for d in imports(m) if d in experiments]
    assert not bad, f"one experiment reaching into another: {bad}"


def test_the_checker_sees_imports_inside_functions():
    assert "unlearn" in imports("recovery") and "store" in imports("fedavg")
