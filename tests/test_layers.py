"""The batch goes one way: data -> model -> log-probs -> losses -> loop -> tools and demo. No module imports a module
of a higher layer, and the package imports no script (README "Read the code" names the layers)."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "nanodpo"

# Bottom to top. A module may import its own layer and the ones below it.
LAYERS = [
    ("base", ["errors", "config", "llamafactory", "repo"]),
    ("data", ["data", "packing", "dpo_batch", "dpo_data", "sft_data", "pt_data"]),
    ("model", ["model", "generation"]),
    ("log-probs", ["logps", "fast"]),
    ("losses", ["dpo", "losses"]),
    ("loop", ["reference", "tracking", "training", "scale", "online", "recipe"]),
    ("tools and demo", ["tools", "demo"]),
]
LAYER_OF = {name: i for i, (_, names) in enumerate(LAYERS) for name in names}


def layer(module: str) -> int:
    """nanodpo.fast.chunked_head -> the layer of `fast`; nanodpo (the package itself) -> the bottom."""
    parts = module.split(".")
    return LAYER_OF[parts[1]] if len(parts) > 1 else 0


def imports(path: Path) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append(node.module)
            if node.module == "nanodpo":  # `from nanodpo import training`
                found += [f"nanodpo.{alias.name}" for alias in node.names]
    return found


MODULES = sorted(PACKAGE.rglob("*.py"))


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def test_every_module_has_a_layer():
    unplaced = [module_name(p) for p in MODULES if module_name(p) != "nanodpo" and module_name(p).split(".")[1]
                not in LAYER_OF]  # fmt: skip
    assert not unplaced, f"give these modules a layer in LAYERS: {unplaced}"


@pytest.mark.parametrize("path", MODULES, ids=module_name)
def test_imports_go_down(path):
    source = module_name(path)
    upward = [
        f"{source} ({LAYERS[layer(source)][0]}) imports {target} ({LAYERS[layer(target)][0]})"
        for target in imports(path)
        if target.startswith("nanodpo.") and layer(target) > layer(source)
    ]
    scripts = [target for target in imports(path) if target.startswith("train_")]
    assert not upward, "\n".join(upward)
    assert not scripts, f"{source} imports the script(s) {scripts}: the package never imports a script"


def test_the_check_sees_an_upward_import(tmp_path):
    """The test above can fail: an import from the loop layer in a losses module is caught."""
    bad = tmp_path / "bad.py"
    bad.write_text("from nanodpo.training import RunState\nimport nanodpo.recipe\n")
    assert imports(bad) == ["nanodpo.training", "nanodpo.recipe"]
    assert layer("nanodpo.training") > layer("nanodpo.losses.pair")
