"""A Griffe extension: our Keras-style docstrings, rendered as Markdown.

Two conventions of the library's docstrings that Google-style parsing
misreads, rewritten before the docstrings are parsed (the source is left
as it is):

- a doctest (`>>>` lines and their output, up to a blank line) becomes a
  fenced `pycon` block, where Markdown would read `>>>` as a quote;
- an `Args:` item naming several arguments (`rank, alpha, ...: As in
  LoRALayer.`, possibly over several lines) becomes one item per argument
  with the same description (a `...` is dropped).
"""

import re

import griffe

_NAMES = re.compile(r"[\w*.]+(?:\s*,\s*[\w*.]+)*\s*,?")


def _fence_doctests(lines):
    out, i = [], 0
    while i < len(lines):
        line = lines[i]
        if line.lstrip().startswith(">>>"):
            indent = line[: len(line) - len(line.lstrip())]
            block = []
            while i < len(lines) and lines[i].strip():
                block.append(lines[i][len(indent) :])
                i += 1
            out += [indent + "```pycon", *[indent + b for b in block]]
            out.append(indent + "```")
            continue
        out.append(line)
        i += 1
    return out


def _split_grouped_args(lines):
    out, i = [], 0
    while i < len(lines):
        line = lines[i]
        stripped = line.strip()
        head = stripped.split(":", 1)[0]
        grouped = "," in head and (
            ":" in stripped or _NAMES.fullmatch(stripped)
        )
        if not grouped or not _NAMES.fullmatch(head.strip().rstrip(",")):
            if not (grouped and ":" not in stripped):
                out.append(line)
                i += 1
                continue
        indent = line[: len(line) - len(line.lstrip())]
        text = stripped
        i += 1
        while ":" not in text and i < len(lines):  # the names go on
            text += " " + lines[i].strip()
            i += 1
        names, description = text.split(":", 1)
        rest = []
        while i < len(lines) and (
            lines[i].startswith(indent + " ") and lines[i].strip()
        ):
            rest.append(lines[i])
            i += 1
        for name in names.split(","):
            name = name.strip()
            if name and name != "...":
                out.append(f"{indent}{name}: {description.strip()}")
                out += rest
    return out


class KerasDocstrings(griffe.Extension):
    def on_object(self, *, obj, **kwargs):
        if obj.docstring is None:
            return
        lines = obj.docstring.value.splitlines()
        lines = _fence_doctests(lines)
        if "Args:" in obj.docstring.value:
            start = lines.index("Args:") if "Args:" in lines else None
            if start is not None:
                end = start + 1
                while end < len(lines) and (
                    not lines[end].strip() or lines[end].startswith(" ")
                ):
                    end += 1
                lines[start + 1 : end] = _split_grouped_args(
                    lines[start + 1 : end]
                )
        obj.docstring.value = "\n".join(lines)
