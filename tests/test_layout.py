"""The package's layout: one folder per concern, imports running one way
(from the command line down to the layers), no import circle."""

import ast
import pathlib

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "keras_lora"
# Lowest first: a room may import only from rooms before it.
ORDER = [
    "registration",
    "utils",
    "quant",
    "layers",
    "model",
    "workflow",
    "lowrank",
    "sharding",
    "adapters",
    "peft",
    "serving",
    "compare",
    "bench",
    "experiments",
    "commands",
    "cli",
]
TOP = {"__init__", "__main__"}  # the public API and `python -m`


def _room(path):
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    return parts[0]


def _imports(path):
    """Every `keras_lora` room `path` imports, at any depth of the file."""
    rooms = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module] + [
                f"{node.module}.{a.name}" for a in node.names
            ]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        for name in names:
            parts = name.split(".")
            if parts[0] == "keras_lora" and len(parts) > 1:
                rooms.add(parts[1])
    return rooms - {"__version__"}


def _graph():
    graph = {}
    for path in PACKAGE.rglob("*.py"):
        room = _room(path)
        graph.setdefault(room, set()).update(_imports(path) - {room})
    return graph


def test_every_room_is_in_the_order():
    assert set(_graph()) - TOP == set(ORDER)


def test_imports_run_one_way():
    rank = {room: i for i, room in enumerate(ORDER)}
    upward = [
        f"{room} imports {other}"
        for room, others in _graph().items()
        if room not in TOP
        for other in others
        if other in rank and rank[other] >= rank[room]
    ]
    assert upward == []


MAX_LINES = 300


def test_every_module_is_at_most_300_lines():
    long = {
        str(path.relative_to(PACKAGE)): len(path.read_text().splitlines())
        for path in PACKAGE.rglob("*.py")
    }
    assert {p: n for p, n in long.items() if n > MAX_LINES} == {}
