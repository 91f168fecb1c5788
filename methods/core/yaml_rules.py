"""The one YAML reader of bdo: spaces, studies, presets, recipes, --set values, stored run configs, and the GPU
scripts that read presets without the orchestrator. Torch-free and Ray-free, so every one of them can import it."""

from __future__ import annotations

import re
from collections.abc import Hashable

import yaml


class Loader(yaml.SafeLoader):
    """The one YAML reader of bdo (spaces, studies, presets, recipes, --set values and stored run configs).

    PyYAML follows YAML 1.1, where a float needs a dot and a signed exponent, so 1e-3 and 5E-4 come back as
    strings and fail config validation; this loader reads numbers by YAML 1.2 rules. It also refuses a key given
    twice in one mapping, which YAML 1.1 resolves silently to the last value."""

    yaml_implicit_resolvers = {
        first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:float"]
        for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
    }

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            self.flatten_mapping(node)  # merge keys (<<) may repeat what they override
            seen: set = set()
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=True)
                if not isinstance(key, Hashable):
                    continue  # SafeLoader refuses it with its own message
                if key in seen:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"duplicate key {key!r} (a mapping names each key once)", key_node.start_mark
                    )
                seen.add(key)
        return super().construct_mapping(node, deep)


Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"""^(?:
    [-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
    |[-+]?[0-9][0-9_]*[eE][-+]?[0-9]+
    |[-+]?\.[0-9][0-9_]*(?:[eE][-+]?[0-9]+)?
    |[-+]?\.(?:inf|Inf|INF)
    |\.(?:nan|NaN|NAN))$""",
        re.X,
    ),
    list("-+0123456789."),
)


def read_yaml(text: str):
    return yaml.load(text, Loader=Loader)  # Loader is a SafeLoader: plain data only, never Python objects
