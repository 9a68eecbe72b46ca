"""Manifests as people write them: keys in the order given, multi-line text (a config file, a rule's
expression) as a ``|`` block rather than one quoted line."""

from __future__ import annotations

from typing import Any

import yaml


class _ManifestDumper(yaml.SafeDumper):
    pass


def _text(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_ManifestDumper.add_representer(str, _text)


def dump_all(objects: list[dict[str, Any]]) -> str:
    return yaml.dump_all(
        objects,
        Dumper=_ManifestDumper,
        sort_keys=False,
        default_flow_style=False,
        allow_unicode=True,
        width=1 << 16,
    )
