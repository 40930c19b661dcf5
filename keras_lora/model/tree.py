"""Walking a model's layer tree, at any depth, and swapping layers in place.

Keras tracks every sublayer a layer holds (`layer._flatten_layers`): the
operations of Functional and Sequential models, and the layers a custom
layer keeps as attributes (`MultiHeadAttention._query_dense`, keras-hub's
`TransformerEncoder._self_attention_layer`, a list of blocks). The walk
visits all of them, so nothing Keras can see is skipped.
"""

import keras

from keras_lora.layers import LoRALayer


def require_model(model):
    """Raises `TypeError` unless `model` is a `keras.Model`."""
    if not isinstance(model, keras.Model):
        raise TypeError(
            f"Expected a `keras.Model`. Received: model={model!r} of type "
            f"{type(model).__name__}"
        )
    backbone = getattr(model, "backbone", None)
    operations = getattr(model, "_operations", None)
    if (
        isinstance(backbone, keras.Model)
        and operations is not None
        and not any(op is backbone for op in operations)
    ):
        raise ValueError(
            f"Expected a task model that computes with its `backbone`. "
            f"Received: model='{model.name}', whose backbone "
            f"'{backbone.name}' is not in its graph: it was replaced after "
            f"the task was built (`task.backbone = ...`), so `fit` would "
            "train the old one. Adapt the task itself "
            "(`apply_lora(task, ..., inplace=True)`), or build a new task "
            "on the new backbone."
        )


def children(layer):
    """The sublayers Keras tracks directly under `layer`, in order."""
    if isinstance(layer, LoRALayer):
        return []
    return [
        child
        for child in layer._flatten_layers(include_self=False, recursive=False)
        if not isinstance(child, keras.layers.InputLayer)
    ]


def is_backbone(layer):
    """Whether `layer` is a keras-hub `Backbone` (imported or not)."""
    return any(
        c.__name__ == "Backbone" and c.__module__.startswith("keras_hub")
        for c in type(layer).__mro__
    )


def visit(model):
    """Yields `(path, layer, parent)` for every layer under `model`, depth
    first, each layer once (at the first path it is reached by)."""
    seen = set()

    def down(parent, prefix):
        for layer in children(parent):
            if id(layer) in seen:
                continue
            seen.add(id(layer))
            path = f"{prefix}{layer.name}"
            yield path, layer, parent
            # A keras-hub backbone's name is generated (`gpt2_backbone_1`
            # in the second model of a process): its layers' paths leave
            # it out, so they are the same in a task model, in a model
            # built on the backbone, and in the backbone itself.
            inner = prefix if is_backbone(layer) else f"{path}/"
            yield from down(layer, inner)

    yield from down(model, "")


def walk(model):
    """Yields `(path, layer)` for every layer under `model`, depth first,
    each layer once (at the first path it is reached by).

    The path joins layer names with "/" from the top model down, e.g.
    `"transformer_layer_0/self_attention_layer/query"`, so it names a layer
    by where it sits, never by its position in a list. A keras-hub
    backbone's own (generated) name is left out of its layers' paths, so a
    `GPT2CausalLM`, a model built on a `GPT2Backbone` and the backbone
    itself give its layers the same paths.
    """
    for path, layer, _ in visit(model):
        yield path, layer


def parents(model):
    """Returns `{id(layer): [parent, ...]}`: every layer that tracks it."""
    out = {}

    def visit(parent):
        for layer in children(parent):
            first = id(layer) not in out
            out.setdefault(id(layer), [])
            if not any(p is parent for p in out[id(layer)]):
                out[id(layer)].append(parent)
            if first:
                visit(layer)

    visit(model)
    return out


def find(model, kind):
    """Returns `{path: layer}` for the layers of type `kind` in `model`."""
    return {
        path: layer for path, layer in walk(model) if isinstance(layer, kind)
    }


def lora_layers(model):
    """Returns `{path: LoRALayer}` of a model that must have built ones.

    Raises `TypeError` for a non-model, `ValueError` for a model with no
    LoRA layer or with an unbuilt one.
    """
    require_model(model)
    layers = find(model, LoRALayer)
    if not layers:
        raise ValueError(
            "Expected a model with at least one LoRA layer (LoRADense, "
            "LoRAEinsumDense, LoRAEmbedding, LoRAConv...). Received: model="
            f"'{model.name}' with none."
        )
    for path, layer in layers.items():
        if not layer.built:
            raise ValueError(
                f"Expected a built model. Received: {type(layer).__name__} "
                f"'{path}' is not built; call the model on an input first."
            )
    return layers


def _replace_in(container, old, new):
    """Replaces `old` by `new` inside a list, tuple or dict (one level, and
    lists held in a dict); returns (container, found)."""
    storage = getattr(container, "_storage", None)
    if isinstance(storage, (list, dict)):
        # TensorFlow's trackable wrappers refuse to save a list whose element
        # was replaced through them; replace in the list they wrap and
        # acknowledge it, as an append would.
        _, found = _replace_in(storage, old, new)
        if found and hasattr(container, "_update_snapshot"):
            container._update_snapshot()
        return container, found
    found = False
    if isinstance(container, list):
        for i, item in enumerate(container):
            if item is old:
                container[i] = new
                found = True
            elif isinstance(item, list):
                found |= _replace_in(item, old, new)[1]
    elif isinstance(container, dict):
        for key, item in list(container.items()):
            if item is old:
                container[key] = new
                found = True
            elif isinstance(item, list):
                found |= _replace_in(item, old, new)[1]
    elif isinstance(container, tuple) and any(i is old for i in container):
        items = [new if i is old else i for i in container]
        container = (
            type(container)(*items)
            if hasattr(container, "_fields")
            else type(container)(items)
        )
        found = True
    return container, found


def swap(parent, old, new):
    """Puts `new` where `parent` holds `old`: its tracked layers, its
    attributes (lists, tuples and dicts of layers too) and, for a
    Functional or Sequential model, its graph. Returns whether `old` was
    found. `old` is left as it was.
    """
    tracker = getattr(parent, "_tracker", None)
    locked = bool(tracker and tracker.locked)
    if tracker is not None:
        tracker.unlock()
    found = False
    try:
        if tracker is not None and tracker.is_in_store("layers", old):
            tracker.replace_tracked_value("layers", old, new)
            found = True
        for name, value in list(vars(parent).items()):
            if value is old:
                object.__setattr__(parent, name, new)
                found = True
                continue
            replaced, hit = _replace_in(value, old, new)
            if hit and replaced is not value:
                object.__setattr__(parent, name, replaced)
            found |= hit
        for nodes in getattr(parent, "_nodes_by_depth", {}).values():
            for node in nodes:
                if node.operation is old:
                    node.operation = new
        keys = getattr(parent, "_nodes", None)
        if isinstance(keys, set):
            # A Functional keys its nodes by the operation's id.
            stale = {k for k in keys if k.startswith(f"{id(old)}_ib-")}
            keys -= stale
            keys |= {k.replace(str(id(old)), str(id(new)), 1) for k in stale}
        if found and hasattr(old, "_inbound_nodes"):
            new._inbound_nodes = old._inbound_nodes
            new._outbound_nodes = old._outbound_nodes
            for node in old._inbound_nodes:
                node.operation = new
                for tensor in keras.tree.flatten(node.outputs):
                    history = getattr(tensor, "_keras_history", None)
                    if history is not None and history[0] is old:
                        tensor._keras_history = type(history)(
                            new, *tuple(history)[1:]
                        )
        functional = getattr(parent, "_functional", None)
        if isinstance(parent, keras.Sequential) and functional is not None:
            swap(functional, old, new)
    finally:
        if locked:
            tracker.lock()
    return found


def retrack(model):
    """Rebuilds the torch parameter lists Keras keeps per layer (torch
    backend only), so `model.parameters()` holds the swapped-in weights."""
    for layer in [model] + [layer for _, layer in walk(model)]:
        if hasattr(layer, "_torch_params"):
            layer._track_variables()


def name_scope_of(path):
    """The nested `keras.name_scope`s of a layer path's parents, so that a
    layer built inside them gets variable paths matching where it sits."""
    import contextlib

    stack = contextlib.ExitStack()
    for part in path.split("/")[:-1]:
        stack.enter_context(keras.name_scope(part))
    return stack


def swap_all(model, replacements):
    """Swaps `{path: (old, new)}` into `model`, all or nothing: every old
    layer must be found in each of its parents, else the swaps done are
    undone and `ValueError` names the layer."""
    holders = parents(model)
    done = []
    try:
        for path, (old, new) in replacements.items():
            for parent in holders.get(id(old), [model]):
                if not swap(parent, old, new):
                    raise ValueError(
                        f"Cannot swap the layer at '{path}': its parent "
                        f"'{parent.name}' ({type(parent).__name__}) holds it "
                        "in a way keras_lora cannot see. Please report this "
                        "model."
                    )
                done.append((parent, old, new))
    except BaseException:
        for parent, old, new in reversed(done):
            swap(parent, new, old)
        raise
    finally:
        retrack(model)
