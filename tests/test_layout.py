"""The package's import graph: nothing imports upward and there are no cycles (imports inside functions count).
Layers, lowest first; a module may import its own layer or lower ones (without a cycle)."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

LAYERS = [
    ["build", "_patch", "options"],                  # no loram_fast imports
    ["_ext", "triton_kernels"],                      # load the extension / Triton kernels and their launchers
    ["ops"],                                         # one module per op: reference + backend registration
    ["methods"],                                     # pure math per method, returns LayerInit data
    ["registry", "data", "baselines"],               # method names → functions; gradient batches
    ["targets", "peft_variant"],                     # discovery and checks; peft variant patches
    ["transaction"],                                 # the one writer: undo log, residuals, rollback
    ["compute"],                                     # compute + write of a group of layers
    ["api", "peft_hook", "intruders"],               # init_model; the LoraConfig hook entry point; tools
    ["demo", "selfcheck", ""],                       # entry points; "" is the package __init__
]


def _layer(module: str) -> int:
    parts = module.split(".")[1:]
    head = parts[0] if parts else ""
    for i, names in enumerate(LAYERS):
        if head in names:
            return i
    raise AssertionError(f"{module} has no layer in tests/test_layout.py: add it")


def _modules() -> dict[str, Path]:
    out = {}
    for p in list((ROOT / "loram_fast").rglob("*.py")) + list((ROOT / "triton_kernels").glob("*.py")):
        rel = p.relative_to(ROOT).with_suffix("").parts
        parts = ["loram_fast", *rel] if rel[0] == "triton_kernels" else list(rel)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = p
    return out


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    deps = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            for alias in node.names:
                deps.add(f"{mod}.{alias.name}" if f"{mod}.{alias.name}" in known else mod)
        elif isinstance(node, ast.Import):
            deps.update(a.name for a in node.names)
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "lazy" and node.args:
            if isinstance(node.args[0], ast.Constant):  # dispatch.lazy("loram_fast.triton_kernels.x", "fn")
                deps.add(node.args[0].value)
    return {d for d in deps if d in known and d != name}


def test_no_upward_imports_and_no_cycles():
    mods = _modules()
    graph = {name: _imports(name, path, set(mods)) for name, path in mods.items()}
    upward = [f"{a} (layer {_layer(a)}) imports {b} (layer {_layer(b)})"
              for a, deps in graph.items() for b in deps
              if _layer(b) > _layer(a) and not (a == "loram_fast" or b.startswith(a + "."))]
    assert not upward, "\n".join(upward)
    # cycles, ignoring a package's imports of its own submodules (its __init__ re-exports)
    edges = {a: {b for b in deps if not b.startswith(a + ".")} for a, deps in graph.items()}
    state, stack = {}, []

    def visit(a):
        state[a] = 1
        stack.append(a)
        for b in edges[a]:
            if state.get(b) == 1:
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(b):] + [b]))
            if b not in state:
                visit(b)
        stack.pop()
        state[a] = 2

    for a in sorted(edges):
        if a not in state:
            visit(a)


def test_ops_know_no_backend_names_in_op_code():
    """Op modules register implementations; only dispatch.py decides between backends by name."""
    for p in (ROOT / "loram_fast" / "ops").glob("*.py"):
        if p.name in ("dispatch.py", "__init__.py"):
            continue
        tree = ast.parse(p.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Compare):
                consts = [c.value for c in ast.walk(node) if isinstance(c, ast.Constant)]
                assert not set(consts) & {"torch", "triton", "cuda", "cpu-ext"}, f"{p.name}: compares a backend name"
