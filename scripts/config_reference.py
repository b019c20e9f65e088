"""Write docs/configuration.md's key reference from the config schema's field descriptions.

Each key is described once, by its field in harness/config.py; this script renders one table per
block between the page's two marker comments and leaves the prose around them as it is.

    python scripts/config_reference.py           # rewrite the page's key reference
    python scripts/config_reference.py --check   # exit 1 if it is stale (tests/test_config.py)
    python scripts/config_reference.py --print   # the reference alone, on stdout
"""

from __future__ import annotations

import argparse
import sys
import types
import typing
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import annotated_types
from pydantic import BaseModel
from pydantic.fields import FieldInfo

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run from anywhere, without installing the package

from harness.config import DEFAULT_SEARCH, PARAMS, ConfigFile, SearchSpace, blocks_in  # noqa: E402

PAGE = ROOT / "docs" / "configuration.md"
BEGIN = "<!-- key reference: generated from harness/config.py by `python scripts/config_reference.py` -->"
END = "<!-- end of the generated key reference -->"
COMMAND = "python scripts/config_reference.py"


def cell(text: str) -> str:
    return text.replace("|", "\\|").replace("<", "&lt;").replace("\n", " ")  # a bare <name> would read as HTML


def yaml_text(value: Any) -> str:
    """A value as YAML writes it: null, true, [a, b]."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, list):
        return "[" + ", ".join(yaml_text(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {yaml_text(v)}" for k, v in value.items()) + "}"
    return str(value)


def bounds_text(metadata: list) -> str:
    bounds = {}
    for item in metadata:
        for name in ("ge", "le", "gt", "lt"):
            if isinstance(item, getattr(annotated_types, name.capitalize())):
                bounds[name] = getattr(item, name)
    if "ge" in bounds and "le" in bounds:
        return f" in [{bounds['ge']}, {bounds['le']}]"
    symbols = {"ge": ">=", "gt": ">", "le": "<=", "lt": "<"}
    return "".join(f" {symbols[name]} {value}" for name, value in bounds.items())


def type_text(tp: Any, metadata: list) -> str:
    """A field's type in words: `auto or int > 0`, `number in [0.01, 0.9]`, `maximize | minimize`."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Annotated:
        inner = [m for item in tp.__metadata__ for m in (item.metadata if isinstance(item, FieldInfo) else [item])]
        return type_text(args[0], [*metadata, *inner])
    if origin in (Union, types.UnionType):
        if set(args) == {int, float}:
            return "number" + bounds_text(metadata)
        return " or ".join(type_text(a, metadata) for a in args)
    if origin is Literal:
        return " | ".join(yaml_text(a) for a in args)
    if origin is list:
        return f"list of {type_text(args[0], [])}"
    if origin is dict:
        return "mapping"
    names = {int: "int", float: "number", str: "text", bool: "true | false", type(None): "null"}
    return names.get(tp, "any") + (bounds_text(metadata) if tp in (int, float) else "")


def block_table(model: type[BaseModel], shown: dict[type, str]) -> list[str]:
    rows = ["| key | type | default | description |", "| --- | --- | --- | --- |"]
    for name, field in model.model_fields.items():
        nested = next(blocks_in(field.annotation), None)
        if nested is not None:
            kind, default = f"mapping: the keys of `{shown[nested]}`", ""
            kind = f"list of {kind}" if typing.get_origin(field.annotation) is list else kind
        else:
            kind = type_text(field.annotation, list(field.metadata))
            default = f"`{yaml_text(field.get_default(call_default_factory=True))}`"
        rows.append(f"| `{name}` | {cell(kind)} | {cell(default)} | {cell(field.description or '')} |")
    return rows


def search_table() -> list[str]:
    rows = ["| parameter | values | default | description |", "| --- | --- | --- | --- |"]
    for name, (kind, allowed, _) in PARAMS.items():
        if kind == "bool":
            values = "true | false"
        elif name == "backbone":
            values = "a backbone's name (harness/zoo.py)"
        elif isinstance(allowed, list):
            values = " | ".join(allowed)
        else:
            values = f"{kind} in [{allowed[0]}, {allowed[1]}]"
        default = f"`{yaml_text(DEFAULT_SEARCH[name])}`" if name in DEFAULT_SEARCH else "not searched"
        description = SearchSpace.model_fields[name].description or ""
        rows.append(f"| `{name}` | {cell(values)} | {cell(default)} | {cell(description)} |")
    return rows


def reference_markdown() -> str:
    """The key reference: one table per block. A block used in several places (train.head and
    train.finetune, every data block) has one table, the others point to it."""
    lines: list[str] = []
    shown: dict[type, str] = {}  # a block's model -> the key of its table

    def block(key: str, description: str, model: type[BaseModel]) -> None:
        description = " ".join(description.split())  # a docstring's lines, as one paragraph
        lines.extend(["", f"### `{key}`", "", f"{description[:1].upper()}{description[1:]}.", ""])
        inner = []
        for name, field in model.model_fields.items():
            nested = next(blocks_in(field.annotation), None)
            if nested is not None and nested not in shown:
                shown[nested] = f"{key}.{name}" + ("[]" if typing.get_origin(field.annotation) is list else "")
                inner.append((field.description or "", nested))
        lines.extend(search_table() if model is SearchSpace else block_table(model, shown))
        for description, nested in inner:
            block(shown[nested], description, nested)

    for key, field in ConfigFile.model_fields.items():
        model = next(blocks_in(field.annotation))
        shown[model] = key
        block(key, field.description or "", model)
    return "\n".join(lines).lstrip("\n") + "\n"


def with_reference(page: str) -> str:
    """The page with its generated part (between the markers) made current."""
    start, end = page.index(BEGIN) + len(BEGIN), page.index(END)
    return page[:start] + "\n" + reference_markdown() + page[end:]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if the page's key reference is stale")
    parser.add_argument("--print", action="store_true", help="print the key reference instead of writing the page")
    args = parser.parse_args(argv)
    if args.print:
        print(reference_markdown(), end="")
        return 0
    page = PAGE.read_text()
    current = with_reference(page)
    if args.check:
        if current != page:
            print(f"{PAGE.relative_to(ROOT)}: the key reference is stale; run `{COMMAND}`", file=sys.stderr)
            return 1
        return 0
    if current != page:
        PAGE.write_text(current)
    print(f"{PAGE.relative_to(ROOT)}: {'updated' if current != page else 'already current'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
