"""Follow the training config from ``dtlab.train.train`` through the calls that receive it, and
count how often the walk returns to a module it has already visited (a measure of how far a
config travels back and forth between modules; issue 20).

Reads the code with ``ast`` only (nothing is imported). From ``train(cfg, ...)`` it visits, in
source order, every call that passes the tracked config (a name bound to it) or one of its
groups (``cfg.optim``; not a value read from it, such as ``cfg.data.env``), resolves the callee
through the module's imports (``from dtlab.x import f``, ``import dtlab.x``, classes' methods,
``self.method``), and walks into it with the parameter that received it. A
function is walked once. Prints the modules in visiting order, the number of distinct modules and
the number of returns (entering a module other than the current one that was entered before).

    python benchmarks/cfg_walk.py [SRC_DIR] [--start dtlab.train:train] [--param cfg]
"""

from __future__ import annotations

import argparse
import ast
import sys
from pathlib import Path


def load_modules(src: Path) -> dict[str, ast.Module]:
    modules = {}
    for path in sorted((src / "dtlab").rglob("*.py")):
        parts = path.relative_to(src).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        modules[name] = ast.parse(path.read_text(), str(path))
    return modules


def top_defs(tree: ast.Module) -> dict[str, ast.AST]:
    return {n.name: n for n in tree.body
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))}


def imports(module: str, tree: ast.Module, modules) -> dict[str, tuple[str, str | None]]:
    """Local name -> (module, attribute or None for a module)."""
    found = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            base = node.module
            if node.level:  # relative
                pkg = module.split(".")[: len(module.split(".")) - node.level + (
                    1 if module in modules and _is_package(module, modules) else 0)]
                base = ".".join(pkg + ([node.module] if node.module else []))
            for alias in node.names:
                full = f"{base}.{alias.name}"
                found[alias.asname or alias.name] = (full, None) if full in modules else (base, alias.name)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.asname:
                    found[alias.asname] = (alias.name, None)
    return found


def _is_package(module, modules):
    return any(m.startswith(module + ".") for m in modules)


def resolve(call: ast.Call, module: str, cls: str | None, modules, defs, imps):
    """(module, function node, is_method) of the callee, or None when outside dtlab."""
    f = call.func
    if isinstance(f, ast.Name):
        if f.id in defs[module]:
            return _callable(module, defs[module][f.id])
        if f.id in imps[module]:
            mod, attr = imps[module][f.id]
            if attr and mod in defs and attr in defs[mod]:
                return _callable(mod, defs[mod][attr])
    elif isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name):
        owner = f.value.id
        if owner in ("self", "cls") and cls:
            node = defs[module].get(cls)
            return _method(module, node, f.attr)
        if owner in imps[module]:
            mod, attr = imps[module][owner]
            if attr is None and mod in defs and f.attr in defs[mod]:
                return _callable(mod, defs[mod][f.attr])
            if attr and mod in defs and attr in defs[mod]:
                return _method(mod, defs[mod][attr], f.attr)
        if owner in defs[module]:
            return _method(module, defs[module][owner], f.attr)
    return None


def _callable(module, node):
    if isinstance(node, ast.ClassDef):
        return _method(module, node, "__init__") or _method(module, node, "__post_init__")
    return module, node, None


def _method(module, node, name):
    if isinstance(node, ast.ClassDef):
        for item in node.body:
            if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)) and item.name == name:
                return module, item, node.name
    return None


def walk(src: Path, start: str, param: str) -> list[str]:
    modules = load_modules(src)
    defs = {m: top_defs(t) for m, t in modules.items()}
    imps = {m: imports(m, t, modules) for m, t in modules.items()}
    mod, func = start.split(":")
    order: list[str] = []
    seen: set[int] = set()

    def visit(module: str, node, cls: str | None, tracked: set[str]) -> None:
        if id(node) in seen:
            return
        seen.add(id(node))
        order.append(module)
        for call in _calls_in_order(node):
            names = [(i, a) for i, a in enumerate(call.args) if _rooted(a, tracked)]
            kws = [k for k in call.keywords if _rooted(k.value, tracked)]
            if not names and not kws:
                continue
            target = resolve(call, module, cls, modules, defs, imps)
            if target is None:
                continue
            tmod, tnode, tcls = target
            params = [a.arg for a in tnode.args.posonlyargs + tnode.args.args]
            if tcls and params and params[0] in ("self", "cls"):
                params = params[1:]
            got = {params[i] for i, _ in names if i < len(params)} | {k.arg for k in kws if k.arg}
            if got:
                visit(tmod, tnode, tcls, got)
                order.append(module)  # back in the caller

    visit(mod, defs[mod][func], None, {param})
    return order


# TrainConfig's groups: config objects themselves (``cfg.optim``); any other attribute is a value.
GROUPS = {"data", "model", "optim", "run", "evaluation"}


def _rooted(expr, tracked: set[str]) -> bool:
    """``cfg`` or one of its groups (``cfg.optim``): a config object, not a value read from it
    (``cfg.data.env``, ``cfg.dropout`` are values: a helper handed one receives what it uses)."""
    if isinstance(expr, ast.Attribute):
        if expr.attr not in GROUPS:
            return False
        expr = expr.value
    return isinstance(expr, ast.Name) and expr.id in tracked


def _calls_in_order(node) -> list[ast.Call]:
    calls = [n for n in ast.walk(node) if isinstance(n, ast.Call)]
    return sorted(calls, key=lambda c: (c.lineno, c.col_offset))


def returns(order: list[str]) -> int:
    """Entries into a module other than the current one that the walk has been in before; the
    way back to a caller counts too (it is a return to an already visited module)."""
    count, visited, current = 0, set(), None
    for module in order:
        if module != current:
            if module in visited:
                count += 1
            visited.add(module)
            current = module
    return count


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("src", nargs="?", default=str(Path(__file__).resolve().parents[1] / "src"))
    p.add_argument("--start", default="dtlab.train:train")
    p.add_argument("--param", default="cfg")
    args = p.parse_args(argv)
    order = walk(Path(args.src), args.start, args.param)
    compact = [m for i, m in enumerate(order) if i == 0 or m != order[i - 1]]
    print(" -> ".join(compact))
    print(f"modules: {len(set(order))}, returns to an already visited module: {returns(order)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
