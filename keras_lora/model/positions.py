"""Where a layer sits in a model as child indices, level by level: the same
in a model rebuilt from the same code, whatever names Keras generated
(`dense_3` for `dense` in a second instance)."""

from keras_lora.model.tree import children, visit


def positions(model):
    """`{path: (i, j, ...)}`: where each layer under `model` sits as child
    indices, level by level. A model rebuilt from the same code has its
    layers at the same positions whatever names Keras generated."""
    where = {id(model): ()}
    index = {}  # id(parent) -> {id(child): its index}, listed once
    out = {}
    for path, layer, parent in visit(model):
        if id(parent) not in index:
            index[id(parent)] = {
                id(x): i for i, x in enumerate(children(parent))
            }
        where[id(layer)] = where[id(parent)] + (index[id(parent)][id(layer)],)
        out[path] = where[id(layer)]
    return out


def at(model, position):
    """The layer at `position` (see `positions`), or None."""
    layer = model
    for index in position:
        found = children(layer)
        if not 0 <= index < len(found):
            return None
        layer = found[index]
    return layer
